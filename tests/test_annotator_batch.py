"""The label batch job on the tiny Llama (transformers backend): selection, provenance, resume, errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from annotator.backends.openai_backend import EndpointError
from annotator.batch import LabelJob, SelectionError, run_label_job
from annotator.labeler import Labeler
from annotator.models import ModelNotFoundError
from annotator.prompts import EmptyProductTextError, PairText
from annotator.tiny import build_tiny_adapter
from labelstore import Store
from labelstore.catalog import generate_catalog, write_catalog

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store holding the generated catalog (220 pairs, esci import labels)."""
    store = Store(tmp_path / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=3, seed=0))
    return store


@pytest.fixture(scope="module")
def labeler(tiny_llama: Path) -> Labeler:
    return Labeler(str(tiny_llama), "home-improvement", backend="transformers")


def _job(tiny_llama: Path, **changes) -> LabelJob:
    settings = {"model": str(tiny_llama), "policy": "home-improvement", "backend": "transformers", "chunk_size": 16}
    return LabelJob(**{**settings, **changes})


def _direct_label_probs(model, tokenizer, prompts: list[str], labels: list[str], temperature: float = 1.0) -> np.ndarray:
    """One unpadded forward pass per prompt; softmax over the last position's logits at the label tokens.

    The label token ids are looked up by hand: the tiny tokenizer is byte-level BPE, so " relevant"
    is the single token "Ġrelevant"."""
    import torch

    ids = [tokenizer.convert_tokens_to_ids("\u0120" + label) for label in labels]
    assert len(set(ids)) == len(labels) and tokenizer.unk_token_id not in ids
    rows = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            last = model(**encoded).logits[0, -1, ids].double() / temperature
        rows.append(torch.softmax(last, dim=-1).numpy())
    return np.array(rows)


def test_labeler_scores_every_label_with_probabilities(labeler: Labeler, tiny_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # prompts of different lengths: the batch is left-padded, and the label is read after the last real token
    pairs = [PairText("cordless drill", "Philips 18v cordless drill"), PairText("drill bit", "Bosch drill bit set"),
             PairText("garden hose", "Heavy duty 50 ft garden hose with brass nozzle, kink free")]
    probs = labeler.score(pairs)
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [labeler.policy.render(pair) for pair in pairs]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 3
    expected = _direct_label_probs(model, tokenizer, prompts, ["relevant", "partial", "irrelevant"])
    assert expected.min() > 0.02 and expected.max() < 0.98, expected  # away from 0 and 1: the tolerance means something
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert labeler.author.endswith(f"+base@home-improvement:{labeler.policy.version}")
    assert labeler.score([]).shape == (0, 3)


def test_adapter_loads_and_meta_temperature_is_applied(tiny_llama: Path, tmp_path: Path, labeler: Labeler) -> None:
    adapter = build_tiny_adapter(tiny_llama, tmp_path / "lora", meta={"temperature": 2.0})
    tuned = Labeler(str(tiny_llama), "home-improvement", backend="transformers", adapter=str(adapter))
    pairs = [PairText("cordless drill", "Philips 18v cordless drill")]
    logprobs = tuned.logprobs(pairs)
    assert not np.allclose(logprobs, labeler.logprobs(pairs), atol=1e-3), "the adapter changes the scores"
    # reference: the adapter merged into the base weights by PEFT, scored directly, temperature 2 from meta.json
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [tuned.policy.render(pair) for pair in pairs]
    labels = ["relevant", "partial", "irrelevant"]
    expected = _direct_label_probs(merged, tokenizer, prompts, labels, temperature=2.0)
    unscaled = _direct_label_probs(merged, tokenizer, prompts, labels)
    assert np.abs(expected - unscaled).max() > 0.01, "temperature 2 visibly changes these probabilities"
    np.testing.assert_allclose(tuned.score(pairs), expected, atol=1e-5)
    assert "+lora-" in tuned.author


FLAG_PAIRS = [PairText("weed killer", "Concentrated weed killer spray, 1 gallon"),
              PairText("cordless drill", "Philips 18v cordless drill"),
              PairText("garden hose", "Heavy duty 50 ft garden hose with brass nozzle, kink free")]


def _direct_flag_logprobs(model, tokenizer, prompts: list[str]) -> np.ndarray:
    """Log-softmax over the first tokens of " yes" and " no" at the last position, one unpadded pass per prompt."""
    import torch

    ids = [tokenizer.encode(option, add_special_tokens=False)[0] for option in (" yes", " no")]
    rows = []
    for prompt in prompts:
        with torch.inference_mode():
            last = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1, ids].double()
        rows.append(torch.log_softmax(last, dim=-1).numpy())
    return np.array(rows)


def test_flags_are_a_yes_no_pass_after_the_most_probable_grade(labeler: Labeler, tiny_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert labeler.flag_names == ["pesticide"]
    probs, flags = labeler.score_with_flags(FLAG_PAIRS)
    assert probs.shape == (3, 3) and flags.shape == (3, 1)
    grades = [labeler.label_names[i] for i in probs.argmax(axis=1)]
    prompts = labeler.flag_prompts(FLAG_PAIRS, grades)
    assert prompts[0] == labeler.policy.render(FLAG_PAIRS[0]) + f" {grades[0]}\nFlag pesticide:"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    expected = _direct_flag_logprobs(model, AutoTokenizer.from_pretrained(tiny_llama), prompts)
    logprobs = labeler.flag_logprobs(FLAG_PAIRS, grades)
    assert logprobs.shape == (3, 1, 2)
    np.testing.assert_allclose(logprobs[:, 0, :], expected, atol=1e-4)  # left padding moves float32 by ~6e-5
    np.testing.assert_allclose(flags[:, 0], 1 / (1 + np.exp(expected[:, 1] - expected[:, 0])), atol=1e-4)
    assert 0.02 < flags.min() and flags.max() < 0.98, flags  # a real probability, not a saturated one
    other = labeler.flag_logprobs(FLAG_PAIRS, ["irrelevant"] * 3)
    assert np.abs(other - logprobs).max() > 1e-4, "the grade label is part of the flag prompt"


def test_a_policy_without_flags_scores_none_and_calls_no_engine(labeler: Labeler) -> None:
    esci = labeler.with_policy("esci")
    assert esci.flag_names == [] and esci.flag_token_ids == []
    calls: list[int] = []
    score = esci.backend.label_logprobs

    def counting(prompts, token_ids, options):  # a spy on the real backend: counts, then scores for real
        calls.append(len(prompts))
        return score(prompts, token_ids, options)

    esci.backend.label_logprobs = counting
    try:
        probs, flags = esci.score_with_flags(FLAG_PAIRS)
        assert esci.flag_logprobs(FLAG_PAIRS, ["exact"] * 3).shape == (3, 0, 2)
    finally:
        del esci.backend.label_logprobs
    assert probs.shape == (3, 4) and flags.shape == (3, 0)
    assert calls == [3], "one grade pass, no flag pass"
    assert labeler.score_flags([], []).shape == (0, 1)


def test_flag_temperature_comes_from_the_adapter_meta(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = build_tiny_adapter(tiny_llama, tmp_path / "lora", meta={"flag_temperatures": {"pesticide": 3.0}})
    tuned = Labeler(str(tiny_llama), "home-improvement", backend="transformers", adapter=str(adapter))
    assert tuned.flag_temperatures == [3.0]
    grades = ["relevant"] * 3
    logprobs = tuned.flag_logprobs(FLAG_PAIRS, grades)
    expected = 1 / (1 + np.exp(-(logprobs[:, 0, 0] - logprobs[:, 0, 1]) / 3.0))
    np.testing.assert_allclose(tuned.score_flags(FLAG_PAIRS, grades)[:, 0], expected, atol=1e-9)
    assert np.abs(expected - 1 / (1 + np.exp(-(logprobs[:, 0, 0] - logprobs[:, 0, 1])))).max() > 1e-3


def test_unlabeled_pairs_get_one_llm_label_each_with_provenance(store: Store, tiny_llama: Path, labeler: Labeler) -> None:
    result = run_label_job(store, _job(tiny_llama, limit=24, review_threshold=0.5), labeler=labeler, progress=False)
    assert result.n_selected == 24 and result.n_labelled_now == 24 and not result.resumed
    labels = store.df("SELECT * FROM labels WHERE run_id = ?", [result.run_id])
    assert len(labels) == 24 and labels["pair_id"].is_unique
    assert set(labels["scheme"]) == {"graded3"} and set(labels["source"]) == {"llm"}
    assert set(labels["author"]) == {labeler.author}
    for row in labels.itertuples():
        probs = json.loads(row.probs)
        assert set(probs) == {"relevant", "partial", "irrelevant"}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert row.label == max(probs, key=probs.get) and row.confidence == pytest.approx(probs[row.label], abs=1e-5)
        assert row.needs_review == (row.confidence < 0.5)
    assert sum(result.label_counts.values()) == 24
    run = store.df("SELECT status, metrics FROM runs WHERE run_id = ?", [result.run_id]).iloc[0]
    assert run["status"] == "ok" and json.loads(run["metrics"])["n_labelled_now"] == 24
    flags = store.df("SELECT l.pair_id, f.flag, f.probability, f.decision FROM label_flags f JOIN labels l "
                     "USING (label_id) WHERE l.run_id = ?", [result.run_id])
    assert len(flags) == 24 and set(flags["flag"]) == {"pesticide"} and flags["decision"].isna().all()
    assert flags["probability"].between(0, 1).all() and flags["probability"].nunique() > 1
    params = json.loads(store.scalar("SELECT params FROM runs WHERE run_id = ?", [result.run_id]))
    assert params["flags_scored"] == ["pesticide"] and params["score_flags"] is True
    assert result.flagged == {"pesticide": int((flags["probability"] >= 0.5).sum())}
    again = run_label_job(store, _job(tiny_llama, limit=24), labeler=labeler, progress=False)
    assert again.run_id != result.run_id, "a finished run is not resumed"
    assert set(store.df("SELECT pair_id FROM labels WHERE run_id = ?", [again.run_id])["pair_id"]).isdisjoint(
        labels["pair_id"]), "pairs labelled by the first run are no longer unlabeled"


def test_flagged_mined_and_query_file_selections(store: Store, tiny_llama: Path, tmp_path: Path) -> None:
    esci = Labeler(str(tiny_llama), "esci", backend="transformers")
    pair_ids = store.df("SELECT pair_id FROM pairs ORDER BY pair_id LIMIT 6")["pair_id"].tolist()
    for priority, pair in enumerate(pair_ids[:3]):
        store.execute("INSERT INTO review_queue (pair_id, run_id, reason, priority) VALUES (?, 'audit-1', 'test', ?)",
                      [pair, float(priority)])
    for rank, pair in enumerate(pair_ids[3:]):
        store.execute("INSERT INTO mining_candidates (run_id, pair_id, rank, reason) VALUES ('mine-1', ?, ?, 'test')",
                      [pair, rank])
    flagged = run_label_job(store, _job(tiny_llama, policy="esci", select="flagged"), labeler=esci, progress=False)
    items = store.df("SELECT pair_id FROM label_run_items WHERE run_id = ? ORDER BY ordinal", [flagged.run_id])
    assert items["pair_id"].tolist() == pair_ids[:3][::-1], "highest priority first"
    mined = run_label_job(store, _job(tiny_llama, policy="esci", select="mined"), labeler=esci, progress=False)
    assert set(store.df("SELECT pair_id FROM labels WHERE run_id = ?", [mined.run_id])["pair_id"]) == set(pair_ids[3:])
    query = store.scalar("SELECT text FROM queries ORDER BY query_id LIMIT 1")
    query_file = tmp_path / "queries.txt"
    query_file.write_text(f"# one query\n\n  {query.upper()}  \n")
    by_query = run_label_job(store, _job(tiny_llama, policy="esci", select="query-file", query_file=str(query_file)),
                             labeler=esci, progress=False)
    expected = store.scalar("SELECT count(*) FROM pairs JOIN queries USING (query_id) WHERE text = ?", [query])
    assert by_query.n_selected == expected > 0
    with pytest.raises(SelectionError, match="does not exist"):
        run_label_job(store, _job(tiny_llama, select="query-file", query_file=str(tmp_path / "none.txt")),
                      labeler=esci, progress=False)


def test_empty_product_text_rejects_the_selection_and_writes_nothing(store: Store, tiny_llama: Path,
                                                                     labeler: Labeler) -> None:
    blank = store.scalar("SELECT product_id FROM products ORDER BY product_id LIMIT 1")
    store.execute("UPDATE products SET title = ' <br> ' WHERE product_id = ?", [blank])
    runs_before = store.scalar("SELECT count(*) FROM runs")
    with pytest.raises(EmptyProductTextError, match="empty product title"):
        run_label_job(store, _job(tiny_llama), labeler=labeler, progress=False)
    assert store.scalar("SELECT count(*) FROM labels WHERE source = 'llm'") == 0
    assert store.scalar("SELECT count(*) FROM runs") == runs_before


def test_missing_model_is_a_clear_error_before_anything_is_written(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        run_label_job(store, _job(tmp_path / "no-such-model"), progress=False)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        Labeler(str(tmp_path), "esci", backend="transformers")
    assert store.scalar("SELECT count(*) FROM label_runs") == 0


def test_endpoint_down_retries_then_stops_cleanly(store: Store) -> None:
    job = LabelJob(model="tiny", policy="home-improvement", backend="openai", limit=5,
                   backend_options={"endpoints": ["http://127.0.0.1:9/v1"], "retries": 3, "backoff": 0.01})
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"no answer from http://127.0.0.1:9/v1 after 3 attempts"):
        run_label_job(store, job, progress=False)
    assert time.monotonic() - started >= 0.03, "it backed off between attempts"
    assert store.scalar("SELECT count(*) FROM labels WHERE source = 'llm'") == 0


def _mnr(store_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "--store", str(store_path), *args]


def test_cli_errors_exit_2_with_the_message(store: Store, tmp_path: Path) -> None:
    done = subprocess.run(_mnr(store.path, "label", "--model", str(tmp_path / "missing"), "--backend", "transformers"),
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "not found" in " ".join(done.stderr.split())


# Enough chunks that the job is still running when the poll sees its first labels, even on an idle machine
# (24 pairs once finished between two polls).
SIGKILL_PAIRS = 160


def test_resume_after_sigkill_labels_every_pair_exactly_once(store: Store, tiny_llama: Path) -> None:
    command = _mnr(store.path, "label", "--model", str(tiny_llama), "--backend", "transformers", "--policy",
                   "home-improvement", "--chunk-size", "2", "--limit", str(SIGKILL_PAIRS), "--quiet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    written = 0
    while time.monotonic() < deadline and process.poll() is None:
        written = store.scalar("SELECT count(*) FROM labels WHERE source = 'llm'")
        if written >= 4:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = store.scalar("SELECT count(*) FROM labels WHERE source = 'llm'")
    run_id, selected = store.fetchall("SELECT run_id, n_selected FROM label_runs")[0]
    assert 0 < killed_at < selected == SIGKILL_PAIRS, "killed mid-run"
    assert store.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "running"
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run_id}" in " ".join(resumed.stdout.split())
    counts = store.df("SELECT pair_id, count(*) AS n FROM labels WHERE run_id = ? GROUP BY pair_id", [run_id])
    selected_ids = set(store.df("SELECT pair_id FROM label_run_items WHERE run_id = ?", [run_id])["pair_id"])
    assert set(counts["pair_id"]) == selected_ids and (counts["n"] == 1).all()
    assert store.scalar("SELECT count(*) FROM labels WHERE source = 'llm'") == SIGKILL_PAIRS
    assert store.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "ok"
    # every label of the run, before and after the kill, carries its flag exactly once
    assert store.scalar("SELECT count(*) FROM label_flags f JOIN labels l USING (label_id) "
                        "WHERE l.run_id = ? AND f.flag = 'pesticide'", [run_id]) == SIGKILL_PAIRS


def test_mnr_label_no_flags_writes_labels_without_flags_in_a_run_of_its_own(store: Store, tiny_llama: Path) -> None:
    command = _mnr(store.path, "label", "--model", str(tiny_llama), "--backend", "transformers", "--policy",
                   "home-improvement", "--limit", "4", "--quiet")
    plain = subprocess.run([*command, "--no-flags"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    run_id = store.scalar("SELECT run_id FROM label_runs")
    assert store.scalar("SELECT count(*) FROM labels WHERE run_id = ?", [run_id]) == 4
    assert store.scalar("SELECT count(*) FROM label_flags") == 0
    params = json.loads(store.scalar("SELECT params FROM runs WHERE run_id = ?", [run_id]))
    assert params["flags_scored"] == [] and params["score_flags"] is False
    flagged = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert flagged.returncode == 0, flagged.stderr
    assert "flagged (P >= 0.5): pesticide" in flagged.stdout and "flagged" not in plain.stdout
    assert store.scalar("SELECT count(DISTINCT run_id) FROM label_runs") == 2, "a flag run is not a --no-flags run"
    assert store.scalar("SELECT count(*) FROM label_flags") == 4
