"""Benchmark scripts: `python -m bench.run_all [--quick]` runs every `bench/bench_*.py`."""
