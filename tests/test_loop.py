"""The Mine and Refine loop (`app.loop`): step framework, resume after failure, and the whole
loop on the generated catalog with the tiny Llama and MiniLM; plus `bench.run_all`'s table."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from annotator.stack import load_stack

from app.loop import (
    STEP_NAMES, STEPS, LoopConfig, StepContext, StepFailed, latest_loop_run, loop_summary, plan_loop, run_loop,
    step_statuses, validate_config,
)
from labelstore.errors import MnrError
from labelstore.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]


def step_runs(store: Store, loop_run_id: str) -> dict[str, list[str]]:
    """Each step's run statuses within a loop run, oldest first."""
    rows = store.fetchall("SELECT kind, status FROM runs WHERE parent_run_id = ? ORDER BY started_at", [loop_run_id])
    runs: dict[str, list[str]] = {}
    for kind, status in rows:
        runs.setdefault(kind.split(":", 1)[1], []).append(status)
    return runs


# -- the framework, with plain step functions ------------------------------------------------------
def counting_steps(calls: list[str], fail_at: set[str]) -> list:
    """Step functions that record their call, fail while their name is in `fail_at`, and pass a value on."""
    def make(name: str):
        def step(ctx: StepContext) -> dict:
            calls.append(name)
            if name in fail_at:
                raise MnrError(f"{name} cannot find its input")
            previous = ctx.output(STEP_NAMES[STEP_NAMES.index(name) - 1])["value"] if name != STEP_NAMES[0] else 0
            return {"value": previous + 1, "items": 10, "unit": "things"}
        return step
    return [dataclasses.replace(step, function=make(step.name)) for step in STEPS]


def test_failure_stops_the_loop_and_a_rerun_resumes_at_the_failed_step(tmp_path: Path) -> None:
    store = Store(tmp_path / "loop.duckdb")
    config = LoopConfig(loop={"workspace": str(tmp_path / "ws")})
    calls: list[str] = []
    fail_at = {"audit"}
    steps = counting_steps(calls, fail_at)
    with pytest.raises(StepFailed) as failure:
        run_loop(store, config, steps=steps, log=lambda _line: None)
    assert failure.value.step == "audit"
    assert "audit cannot find its input" in str(failure.value) and "continue from 'audit'" in str(failure.value)
    loop_id, status = latest_loop_run(store)
    assert status == "failed"
    assert calls == list(STEP_NAMES[: STEP_NAMES.index("audit") + 1])
    statuses = step_statuses(store, loop_id)
    audit = STEP_NAMES.index("audit")
    assert [statuses.get(s) for s in STEP_NAMES] == ["ok"] * audit + ["failed"] + [None] * (len(STEP_NAMES) - audit - 1)
    error = store.scalar("SELECT error FROM runs WHERE run_id = ?", [loop_id])
    assert "step 'audit'" in error

    fail_at.clear()
    calls.clear()
    result = run_loop(store, config, steps=steps, log=lambda _line: None)
    assert result.loop_run_id == loop_id
    assert calls == list(STEP_NAMES[STEP_NAMES.index("audit"):])
    runs = step_runs(store, loop_id)
    assert all(runs[s] == ["ok"] for s in STEP_NAMES[:audit])  # finished steps did not run again
    assert runs["audit"] == ["failed", "ok"]
    assert store.scalar("SELECT status FROM runs WHERE run_id = ?", [loop_id]) == "ok"
    summary = loop_summary(store, loop_id)
    assert summary["promote"]["value"] == len(STEP_NAMES)  # each step read the previous step's output from the store
    assert summary["ingest"]["items"] == 10 and summary["ingest"]["wall_s"] >= 0 and "items_per_s" in summary["ingest"]


def test_from_only_and_fresh_choose_the_steps(tmp_path: Path) -> None:
    store = Store(tmp_path / "loop.duckdb")
    config = LoopConfig(loop={"workspace": str(tmp_path / "ws")})
    calls: list[str] = []
    steps = counting_steps(calls, set())
    first = run_loop(store, config, steps=steps, log=lambda _line: None).loop_run_id
    calls.clear()
    assert run_loop(store, config, steps=steps, only_step="evaluate", log=lambda _line: None).loop_run_id == first
    assert calls == ["evaluate"]
    calls.clear()
    run_loop(store, config, steps=steps, from_step="train-stage2", log=lambda _line: None)
    assert calls == ["train-stage2", "evaluate", "promote"]
    assert step_runs(store, first)["evaluate"] == ["ok", "ok", "ok"]
    # the latest loop finished every step: a plain re-run starts a new loop run, as does --fresh
    assert plan_loop(store).loop_run_id is None
    calls.clear()
    second = run_loop(store, config, steps=steps, fresh=True, log=lambda _line: None).loop_run_id
    assert second != first and calls == list(STEP_NAMES)
    with pytest.raises(MnrError, match="unknown step 'stage3'"):
        plan_loop(store, from_step="stage3")
    with pytest.raises(MnrError, match="not both"):
        plan_loop(store, from_step="mine", only_step="audit")


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "mnr.toml"
    config.write_text('[loop]\nscheme = "esci"\ncolour = "red"\n[loop.train_stage1]\nepochz = 2\n', encoding="utf-8")
    with pytest.raises(MnrError) as error:
        validate_config(LoopConfig.from_file(config))
    message = str(error.value)
    assert str(config) in message and "[loop] colour" in message and "[loop.train_stage1]: unknown key(s) epochz" in message
    validate_config(LoopConfig.from_file(REPO_ROOT / "mnr.example.toml"))  # every documented key is accepted
    from app.demo import demo_config

    for quick in (False, True):
        validate_config(demo_config(tmp_path / "demo-workspace", quick))


def test_cli_reports_a_failed_step_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "mnr.toml"
    config.write_text('[store]\npath = "loop.duckdb"\n[loop]\nworkspace = "ws"\n'
                      '[loop.ingest]\nsource = "file"\npath = "missing.csv"\n', encoding="utf-8")
    process = subprocess.run([sys.executable, "-m", "app.cli", "run", "--config", str(config)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 2, process.stderr
    assert "loop step 'ingest' failed" in process.stderr and "missing.csv" in process.stderr
    store = Store(tmp_path / "loop.duckdb")
    assert store.fetchall("SELECT kind, status FROM runs WHERE kind LIKE 'loop%' ORDER BY kind") == [
        ("loop", "failed"), ("loop:ingest", "failed")]


def test_audit_reads_hive_partitioned_parquet_in_place(tmp_path: Path) -> None:
    """The scaling-out path for audits: events stay in partitioned Parquet, the same SQL reads them."""
    import duckdb

    from auditor.simulate import SimulationParams, simulate_events

    store = Store(tmp_path / "loop.duckdb")
    events_dir = tmp_path / "events"
    config = LoopConfig(loop={"workspace": str(tmp_path / "ws"), "ingest": {"source": "catalog", "n_families": 3},
                              "engagement": {"source": "parquet", "path": str(events_dir)}})
    run_loop(store, config, only_step="ingest", log=lambda _line: None)
    truth = store.df("SELECT c.pair_id, p.query_id, q.text AS query_text, p.product_id, p.dataset, c.grade "
                     "FROM current_labels c JOIN pairs p USING (pair_id) JOIN queries q USING (query_id)")
    events = simulate_events(truth, SimulationParams(n_sessions=2000, seed=1), max_grade=3)
    with duckdb.connect() as con:
        con.register("events_frame", events)
        con.execute("COPY (SELECT *, strftime(ts, '%Y-%m-%d') AS dt FROM events_frame) TO $out "
                    "(FORMAT parquet, PARTITION_BY (dt))", {"out": str(events_dir)})
    assert len(list(events_dir.glob("dt=*/*.parquet"))) > 1
    run_loop(store, config, only_step="engagement", log=lambda _line: None)
    run_loop(store, config, only_step="audit", log=lambda _line: None)
    loop_id, _ = latest_loop_run(store)
    out = loop_summary(store, loop_id)
    assert out["engagement"]["events_total"] == len(events) and out["engagement"]["simulated"] is True
    assert store.scalar("SELECT count(*) FROM engagement_events") == 0  # read in place, never copied
    audit_events = json.loads(store.scalar("SELECT metrics FROM runs WHERE run_id = ?", [out["audit"]["audit_run_id"]]))
    assert audit_events["events"] == len(events)
    assert Path(out["audit"]["report"]).is_file()


# -- bench/run_all --------------------------------------------------------------------------------
def test_results_table_tolerates_partial_results() -> None:
    from bench.run_all import ScriptOutcome, results_table

    results = {
        "labeler": {"command": "python -m bench.bench_labeler --quick", "figures": [
            {"name": "QWK", "value": 0.612345, "unit": "QWK", "target": ">= 0.6", "anchor": "TF-IDF 0.65"}]},
        "audit": {"simulated": True, "figures": [{"name": "flag precision", "value": 0.9}]},
        "retrieval": {"skipped": "../shared/data is absent"},
        "odd": {"no_figures": 1},
    }
    table = results_table(results, {"crashy": ScriptOutcome("crashy", 1, 2.0, "ValueError: bad | input")})
    assert "| labeler | QWK | 0.6123 | QWK | >= 0.6 | TF-IDF 0.65 | `python -m bench.bench_labeler --quick` |" in table
    assert "| audit | flag precision *simulated* | 0.9 |" in table
    assert "| retrieval | skipped |" in table and "absent" in table
    assert "no `figures` list" in table
    assert "**failed** (exit 1)" in table and "bad \\| input" in table


def test_text_baseline_scores_unseen_queries_by_their_match_with_the_title() -> None:
    import numpy as np
    import pandas as pd
    from annotator.text_baseline import tfidf_linear_probs

    words = ["drill", "paint", "hose", "ladder", "saw", "tile", "lamp", "rake", "glue", "fence", "brush", "valve"]
    rows = []
    for index, word in enumerate(words):
        other = words[(index + 5) % len(words)]
        for variant in ("set", "kit", "pro"):
            rows += [(f"{word} {variant}", f"{word} {variant} model", 1), (f"{word} {variant}", f"{other} {variant} model", 0)]
    frame = pd.DataFrame(rows, columns=["query", "title", "grade"])
    seen = frame["query"].str.split().str[0].isin(words[:8])
    probs = tfidf_linear_probs(frame[seen], frame[~seen], frame.loc[seen, "grade"].to_numpy(), 3)

    assert probs.shape == (int((~seen).sum()), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs[:, 2] == 0).all()  # a class absent from training keeps probability 0
    # The test queries share no word with training queries; only the match features can rank them.
    assert (probs.argmax(axis=1) == frame.loc[~seen, "grade"].to_numpy()).mean() >= 0.9


# -- the whole loop: generated catalog, tiny Llama, MiniLM ----------------------------------------
def loop_toml(workspace: Path, tiny_llama: Path, engagement: str) -> str:
    return f"""
[store]
path = "loop.duckdb"

[loop]
workspace = "{workspace}"
dataset = "synthetic"
scheme = "esci"
holdout_fraction = 0.3
seed = 0

[loop.ingest]
source = "catalog"
n_families = 4

[loop.train_stage1]
max_steps = 2
queries_per_batch = 8
products_per_query = 4
max_seq_length = 32

[loop.mine]
top_k = 10
per_query = 2

[loop.finetune]
sources = ["human", "import"]
train_top_k = 1
max_steps = 4
eval_every = 2
batch_size = 8
warmup_steps = 1
max_minutes = 2.0
heldout_pairs = 40

[loop.relabel]
backend = "transformers"
model = "{tiny_llama}"
policy = "esci"
chunk_size = 16

{engagement}

[loop.trigger]
force = true

[loop.train_stage2]
max_steps = 2
queries_per_batch = 8
products_per_query = 4
max_seq_length = 32

[loop.evaluate]
k = 50
bm25 = true
"""


def test_whole_loop_on_the_catalog_resumes_after_a_bad_engagement_file(tmp_path: Path, tiny_llama: Path) -> None:
    config_path = tmp_path / "mnr.toml"
    missing = tmp_path / "no-such-events.parquet"
    config_path.write_text(loop_toml(tmp_path / "ws", tiny_llama,
                                     f'[loop.engagement]\nsource = "file"\npath = "{missing}"'), encoding="utf-8")
    store = Store(tmp_path / "loop.duckdb")
    lines: list[str] = []
    with pytest.raises(StepFailed) as failure:
        run_loop(store, LoopConfig.from_file(config_path), log=lines.append)
    assert failure.value.step == "engagement" and str(missing) in str(failure.value)
    loop_id = failure.value.loop_run_id
    before = step_runs(store, loop_id)
    engagement = STEP_NAMES.index("engagement")
    assert before == {**{s: ["ok"] for s in STEP_NAMES[:engagement]}, "engagement": ["failed"]}

    config_path.write_text(loop_toml(tmp_path / "ws", tiny_llama,
                                     '[loop.engagement]\nsource = "simulate"\nn_sessions = 1500'), encoding="utf-8")
    result = run_loop(store, LoopConfig.from_file(config_path), log=lines.append)
    assert result.loop_run_id == loop_id and result.ran == list(STEP_NAMES[engagement:])
    after = step_runs(store, loop_id)
    assert all(after[s] == ["ok"] for s in STEP_NAMES[:engagement])  # not re-run
    assert after["engagement"] == ["failed", "ok"]
    assert all(after[s] == ["ok"] for s in STEP_NAMES[engagement + 1:])
    assert store.scalar("SELECT status FROM runs WHERE run_id = ?", [loop_id]) == "ok"

    out = loop_summary(store, loop_id)
    relabelled = store.scalar("SELECT count(DISTINCT pair_id) FROM labels WHERE source = 'llm' AND run_id = ?",
                              [out["relabel"]["label_run_id"]])
    assert relabelled == out["relabel"]["selected"] > 0
    mined = store.scalar("SELECT count(*) FROM mining_candidates WHERE run_id = ?", [out["mine"]["mining_run_id"]])
    assert mined >= out["relabel"]["selected"]
    # the finetune step trained an adapter on labels of training queries only; relabel labelled with it
    from annotator.labeler import adapter_tag, check_adapter
    from trainer.data import is_held_out

    finetune = out["finetune"]
    adapter = Path(finetune["adapter"])
    assert (adapter / "adapter_config.json").is_file() and finetune["reused"] is False and finetune["items"] > 0
    split = json.loads((adapter / "split.json").read_text())
    trained_queries = pd.Series(split["train_query_ids"] + split["dev_query_ids"])
    assert not is_held_out(trained_queries, 0.3, 0).any()
    authors = [row[0] for row in store.fetchall("SELECT DISTINCT author FROM labels WHERE run_id = ?",
                                                [out["relabel"]["label_run_id"]])]
    assert len(authors) == 1 and f"+{adapter_tag(check_adapter(adapter))}" in authors[0].split("@")[0], authors
    heldout = out["relabel"]["heldout"]
    assert heldout["n"] == len(finetune["heldout"]["pair_ids"]) > 0 and heldout["baseline"] == finetune["heldout"]["baseline"]
    assert not set(finetune["heldout"]["pair_ids"]) & set(split["dev_pair_ids"])
    assert sum(heldout["labeler_counts"].values()) == heldout["n"]
    assert all(-1.0 <= heldout[who]["qwk"] <= 1.0 for who in ("labeler", "baseline"))
    assert out["engagement"]["simulated"] is True and out["engagement"]["events_added"] > 0
    assert Path(out["audit"]["report"]).is_file()
    assert set(out["evaluate"]["ndcg@10"]) >= {"zero-shot", "stage1", "stage2", "bm25"}
    assert all(0.0 <= v <= 1.0 for v in out["evaluate"]["ndcg@10"].values())
    # the promotion decision follows the evaluated metrics: Stage 2 against zero-shot (nothing promoted before)
    candidate, baseline = out["train-stage2"]["model_id"], out["evaluate"]["models"]["zero-shot"]
    assert (out["promote"]["candidate"], out["promote"]["baseline"]) == (candidate, baseline)
    recorded = {model_id: json.loads(store.scalar("SELECT metrics FROM models WHERE model_id = ?", [model_id]))
                ["heldout_ndcg@10"] for model_id in (candidate, baseline)}
    assert recorded[candidate] == pytest.approx(out["evaluate"]["ndcg@10"]["stage2"], abs=5e-5)
    assert recorded[baseline] == pytest.approx(out["evaluate"]["ndcg@10"]["zero-shot"], abs=5e-5)
    should_promote = recorded[candidate] > recorded[baseline]  # min_gain 0
    assert out["promote"]["promoted"] is should_promote, (recorded, out["promote"])
    promoted_ids = [row[0] for row in store.fetchall("SELECT model_id FROM models WHERE promoted")]
    assert promoted_ids == ([candidate] if should_promote else [])
    for step in STEP_NAMES:
        assert out[step]["wall_s"] >= 0

    from rich.console import Console

    from app.demo import print_summary

    console = Console(record=True, width=200)
    print_summary(store, loop_id, tmp_path / "ws", console)
    text = console.export_text()
    for expected in ("Loop steps (throughput)", "Labels by source", "llm", "import", "NDCG@10", "zero-shot", "stage2",
                     "engagement is SIMULATED", out["audit"]["report"], "review", "Labeler agreement on",
                     f"labeler held-out QWK {heldout['labeler']['qwk']:.3f} vs text baseline "
                     f"{heldout['baseline']['qwk']:.3f} on the same {heldout['n']:,} pairs"):
        assert expected in text, expected

    # a re-run finds the adapter of the same labels, policy and settings: no second training run
    again = run_loop(store, LoopConfig.from_file(config_path), only_step="finetune", log=lines.append)
    reused = again.outputs["finetune"]
    assert reused["reused"] is True and reused["adapter"] == finetune["adapter"]
    assert reused["heldout"] == finetune["heldout"]
    assert store.scalar("SELECT count(*) FROM runs WHERE kind = 'finetune'") == 1

    # with the retriever's cosine the stack is another recipe: a new adapter, which relabel applies with MiniLM
    config_path.write_text(loop_toml(tmp_path / "ws", tiny_llama, '[loop.engagement]\nsource = "simulate"\n'
                                     'n_sessions = 1500').replace("heldout_pairs = 40", 'heldout_pairs = 40\n'
                                                                  'retriever = "zero-shot"'), encoding="utf-8")
    with_cosine = run_loop(store, LoopConfig.from_file(config_path), only_step="finetune", log=lines.append)
    adapter = with_cosine.outputs["finetune"]
    assert adapter["reused"] is False and adapter["adapter"] != finetune["adapter"]
    assert load_stack(adapter["adapter"]).retriever == "retriever-zero-shot-minilm"
    relabelled = run_loop(store, LoopConfig.from_file(config_path), only_step="relabel", log=lines.append)
    stack_version = load_stack(adapter["adapter"]).version
    assert f"+stack-{stack_version}@" in relabelled.outputs["relabel"]["author"]
    assert relabelled.outputs["relabel"]["labelled_now"] > 0
