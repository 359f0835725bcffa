"""`mnr label --engine ray` in Ray's local mode on the tiny Llama: the in-process engine's labels, an
idempotent import of the scores, and a resume that imports what an earlier attempt scored."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from annotator.batch import LabelJob, run_label_job
from annotator.ray_engine import (RayEngineError, RaySettings, import_scores, require_ray, run_folders,
                                  run_ray_label_job)
from labelstore import Store
from labelstore.catalog import generate_catalog, write_catalog

REPO = Path(__file__).resolve().parents[1]
LABEL_ARGS = ("--backend", "transformers", "--policy", "home-improvement", "--limit", "24", "--chunk-size", "16")


def _store(path: Path) -> Store:
    store = Store(path)
    write_catalog(store, generate_catalog(n_families=3, seed=0))
    return store


def _labels(store: Store) -> pd.DataFrame:
    return store.df("SELECT pair_id, run_id, label, probs, confidence, needs_review, author FROM labels "
                    "WHERE source = 'llm' ORDER BY pair_id")


def _flags(store: Store) -> pd.DataFrame:
    return store.df("SELECT l.pair_id, f.flag, f.probability FROM label_flags f JOIN labels l USING (label_id) "
                    "WHERE l.source = 'llm' ORDER BY l.pair_id, f.flag")


def _mnr(store: Store, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "app.cli", "--store", str(store.path), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_ray_engine_gives_the_in_process_labels_and_imports_idempotently(tmp_path: Path, tiny_llama: Path) -> None:
    local = _store(tmp_path / "local.duckdb")
    job = LabelJob(model=str(tiny_llama), policy="home-improvement", backend="transformers", limit=24,
                   chunk_size=16, backend_options={"dtype": "float32"})
    run_label_job(local, job, progress=False)
    on_ray = _store(tmp_path / "ray.duckdb")
    work = tmp_path / "work"
    done = _mnr(on_ray, "label", "--model", str(tiny_llama), *LABEL_ARGS, "--engine", "ray", "--ray-batch-size",
                "16", "--work-dir", str(work), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]

    expected, got = _labels(local), _labels(on_ray)
    assert len(got) == 24 and got["pair_id"].tolist() == expected["pair_id"].tolist()
    assert got["label"].tolist() == expected["label"].tolist()
    assert got["needs_review"].tolist() == expected["needs_review"].tolist()
    assert got["author"].tolist() == expected["author"].tolist()
    assert got["confidence"].to_numpy() == pytest.approx(expected["confidence"].to_numpy(), abs=1e-6)
    for ours, theirs in zip(got["probs"], expected["probs"]):
        ours, theirs = json.loads(ours), json.loads(theirs)
        assert ours.keys() == theirs.keys()
        assert [ours[k] for k in ours] == pytest.approx([theirs[k] for k in ours], abs=1.5e-6)
    run_id = got["run_id"].iloc[0]
    assert on_ray.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "ok"
    local_flags, ray_flags = _flags(local), _flags(on_ray)
    assert len(ray_flags) == 24 and ray_flags["pair_id"].tolist() == local_flags["pair_id"].tolist()
    assert set(ray_flags["flag"]) == {"pesticide"}, "the policy's flag travels through the scores Parquet"
    assert ray_flags["probability"].to_numpy() == pytest.approx(local_flags["probability"].to_numpy(), abs=1.5e-6)

    scores = run_folders(str(work), run_id).scores
    assert import_scores(on_ray, run_id, scores, threshold=0.6) == 0, "the same scores twice add nothing"
    assert len(_labels(on_ray)) == 24

    # An attempt that died after Ray wrote its scores: the resumed run imports them, scores nothing again.
    lost = got["pair_id"].tolist()[:5]
    on_ray.execute("DELETE FROM labels WHERE run_id = ? AND pair_id IN (SELECT unnest(?))", [run_id, lost])
    on_ray.execute("UPDATE runs SET status = 'failed' WHERE run_id = ?", [run_id])
    resumed = run_ray_label_job(on_ray, job, RaySettings(work_dir=str(work)), progress=False)
    assert resumed.run_id == run_id and resumed.resumed and resumed.n_labelled_now == 5
    assert not require_ray().is_initialized(), "nothing was left to score"
    again = _labels(on_ray)
    assert again["pair_id"].is_unique and len(again) == 24
    assert again["probs"].tolist() == got["probs"].tolist()
    assert _flags(on_ray)["probability"].tolist() == ray_flags["probability"].tolist(), "re-imported flags too"

    # The import half on its own (a cluster wrote the scores): adds what is missing, then nothing.
    on_ray.execute("DELETE FROM labels WHERE run_id = ? AND pair_id IN (SELECT unnest(?))", [run_id, lost[:3]])
    import_step = ("label", "--model", str(tiny_llama), *LABEL_ARGS, "--engine", "ray", "--ray-step", "import",
                   "--run-id", run_id, "--work-dir", str(work))
    for added in (3, 0):
        done = _mnr(on_ray, *import_step)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resumed {run_id}: {added} labelled now" in " ".join(done.stdout.split())
    assert _labels(on_ray)["probs"].tolist() == got["probs"].tolist()
    assert on_ray.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "ok"


def test_export_half_writes_the_selected_pairs(tmp_path: Path, tiny_llama: Path) -> None:
    store = _store(tmp_path / "store.duckdb")
    done = _mnr(store, "label", "--model", str(tiny_llama), *LABEL_ARGS, "--engine", "ray", "--ray-step", "export",
                "--work-dir", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = store.scalar("SELECT run_id FROM label_runs")
    pairs = pd.read_parquet(run_folders(str(tmp_path / "work"), run_id).pairs)
    selected = store.df("SELECT pair_id FROM label_run_items WHERE run_id = ? ORDER BY ordinal", [run_id])
    assert pairs["pair_id"].tolist() == selected["pair_id"].tolist() and len(pairs) == 24
    assert list(pairs.columns) == ["pair_id", "query", "title", "description", "brand"]
    assert store.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "running"
    missing_run = _mnr(store, "label", "--model", str(tiny_llama), *LABEL_ARGS, "--engine", "ray", "--ray-step",
                       "import", "--run-id", run_id, "--work-dir", str(tmp_path / "work"))
    assert missing_run.returncode == 2 and "24 pair(s)" in " ".join(missing_run.stderr.split())
    assert store.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "failed"


def test_scores_of_another_pair_are_rejected_naming_file_row_and_field(tmp_path: Path) -> None:
    store = _store(tmp_path / "store.duckdb")
    store.execute("INSERT INTO runs (run_id, kind, status, params, started_at) "
                  "VALUES ('label-x', 'label', 'running', '{}', now())")
    store.execute("INSERT INTO label_runs (run_id, fingerprint, selection, policy, policy_version, scheme, author, "
                  "n_selected) VALUES ('label-x', 'f', 'unlabeled', 'home-improvement', '1', 'graded3', 'me', 1)")
    pair = store.scalar("SELECT pair_id FROM pairs ORDER BY pair_id LIMIT 1")
    store.execute("INSERT INTO label_run_items (run_id, ordinal, pair_id) VALUES ('label-x', 0, ?)", [pair])
    folder = tmp_path / "scores"
    folder.mkdir()
    good = {"pair_id": [pair], "author": ["me"], "p_relevant": [0.5], "p_partial": [0.25], "p_irrelevant": [0.25]}
    pd.DataFrame({**good, "pair_id": ["nope"]}).to_parquet(folder / "a.parquet")
    with pytest.raises(RayEngineError, match=r"a\.parquet row 1: pair_id 'nope' is not a pair of run label-x"):
        import_scores(store, "label-x", str(folder), threshold=0.6)
    pd.DataFrame({**good, "author": ["someone else"]}).to_parquet(folder / "a.parquet")
    with pytest.raises(RayEngineError, match=r"a\.parquet row 1, author: 'someone else' is not run label-x's author"):
        import_scores(store, "label-x", str(folder), threshold=0.6)
    pd.DataFrame({**good, "p_partial": [0.75]}).to_parquet(folder / "a.parquet")
    with pytest.raises(RayEngineError, match=r"a\.parquet row 1: probabilities sum to 1\.5"):
        import_scores(store, "label-x", str(folder), threshold=0.6)
    pd.DataFrame({**good, "flag_pesticide": [1.25]}).to_parquet(folder / "a.parquet")
    with pytest.raises(RayEngineError, match=r"a\.parquet row 1, flag_pesticide: 1\.25 is not a probability"):
        import_scores(store, "label-x", str(folder), threshold=0.6)
    pd.DataFrame({**good, "label": ["maybe"]}).to_parquet(folder / "a.parquet")
    with pytest.raises(RayEngineError, match=r"a\.parquet row 1, label: 'maybe' is not a label of scheme graded3"):
        import_scores(store, "label-x", str(folder), threshold=0.6)
    pd.DataFrame({k: v for k, v in good.items() if k != "p_partial"}).to_parquet(folder / "a.parquet")
    with pytest.raises(RayEngineError, match=r"a\.parquet: no column 'p_partial'"):
        import_scores(store, "label-x", str(folder), threshold=0.6)
    assert store.scalar("SELECT count(*) FROM labels WHERE run_id = 'label-x'") == 0
    # the label column is the labeler's decision (a stack's cut-points), written as chosen, not re-derived
    pd.DataFrame({**good, "label": ["partial"]}).to_parquet(folder / "a.parquet")
    assert import_scores(store, "label-x", str(folder), threshold=0.6) == 1
    assert import_scores(store, "label-x", str(folder), threshold=0.6) == 0
    label, confidence = store.fetchall("SELECT label, confidence FROM labels WHERE run_id = 'label-x'")[0]
    assert (label, round(confidence, 6)) == ("partial", 0.25)


def test_ray_stays_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, app.cli; assert 'ray' not in sys.modules, 'the CLI imported ray'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayEngineError, match=r"pip install 'mine-refine\[ray\]'"):
        require_ray()


def test_export_refuses_an_adapter_of_another_policy_before_recording_a_run(tmp_path: Path, tiny_llama: Path) -> None:
    from annotator.batch import LabelJob
    from annotator.labeler import PolicyMismatchError
    from annotator.prompts import load_prompt_policy
    from annotator.ray_engine import RaySettings, export_run
    from annotator.tiny import build_tiny_adapter

    esci = load_prompt_policy("esci")
    adapter = build_tiny_adapter(tiny_llama, tmp_path / "esci-lora",
                                 meta={"policy": esci.name, "policy_hash": esci.version, "scheme": "esci"})
    store = _store(tmp_path / "store.duckdb")
    job = LabelJob(model=str(tiny_llama), policy="home-improvement", backend="transformers", adapter=str(adapter),
                   limit=4)
    with pytest.raises(PolicyMismatchError, match="esci"):
        export_run(store, job, RaySettings(work_dir=str(tmp_path / "work")))
    assert store.scalar("SELECT count(*) FROM label_runs") == 0 and not (tmp_path / "work").exists()
