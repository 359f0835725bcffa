# Two commands: `make demo` and `make test`. Both bootstrap .venv with pinned versions first.
PY := .venv/bin/python
MNR := .venv/bin/mnr

.PHONY: venv demo test bench clean-demo

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(MNR) demo

test: venv
	@bash scripts/install-browser.sh
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) -m bench.run_all $(BENCH_ARGS)

clean-demo:
	rm -rf demo-workspace
