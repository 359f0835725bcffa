"""Hybrid retrieval on a small set whose blended scores and NDCG@10 are worked out by hand.

Grades 0 / 1 / 2. Bands by hand: P(grade >= 1 | s) = s, P(grade >= 2 | s) = clip(2s - 1, 0, 1), so the
calibrated neural score (expected grade / 2) is (s + clip(2s - 1, 0, 1)) / 2.

q1: neural a 0.9, b 0.6, c 0.3; BM25 a 0, b 10, c 5; judged a 2, c 1 (b irrelevant).
q2: neural d 0.35, e 0.20, f 0.05; BM25 d 3, e 4, f 0; judged e 2.
"""
from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from app.cli import app
from labelstore import Store
from labelstore.errors import MnrError
from labelstore.catalog import generate_catalog, write_catalog
from trainer.bands import ScoreBands
import numpy as np
import pandas as pd

from trainer.evaluation import (
    best_weight_on, best_weight_per_query, judged_only, judged_products, judged_share, learned_fusion, retrieval_metrics,
)
from trainer.hybrid import calibrated, calibrated_blend, choose_weight, complete_runs, hybrid_runs, minmax_blend, rrf

BANDS = ScoreBands((0, 1, 2), ("irrelevant", "partial", "relevant"), (0.4, 0.6),
                   (((0.0, 1.0), (0.0, 1.0)), ((0.5, 1.0), (0.0, 1.0))))
NEURAL = {"q1": {"a": 0.9, "b": 0.6, "c": 0.3}, "q2": {"d": 0.35, "e": 0.20, "f": 0.05}}
LEXICAL = {"q1": {"a": 0.0, "b": 10.0, "c": 5.0}, "q2": {"d": 3.0, "e": 4.0, "f": 0.0}}
QRELS = {"q1": {"a": 2, "c": 1}, "q2": {"e": 2}}
L2 = math.log2
IDCG_Q1 = 2 / L2(2) + 1 / L2(3)
NDCG_Q1_BAC = (2 / L2(3) + 1 / L2(4)) / IDCG_Q1  # ranking b, a, c
NDCG_Q1_ABC = (2 / L2(2) + 1 / L2(4)) / IDCG_Q1  # ranking a, b, c
NDCG_Q1_BCA = (1 / L2(3) + 2 / L2(4)) / IDCG_Q1  # ranking b, c, a
NDCG_Q2_E_SECOND = (2 / L2(3)) / (2 / L2(2))


def ndcg(run: dict) -> float:
    return retrieval_metrics(QRELS, run, top_grade=2)["ndcg@10"]


def test_calibrated_blend_matches_hand_computation() -> None:
    assert calibrated(NEURAL, BANDS)["q1"] == pytest.approx({"a": 0.85, "b": 0.4, "c": 0.15})
    assert calibrated(NEURAL, BANDS)["q2"] == pytest.approx({"d": 0.175, "e": 0.10, "f": 0.025})
    blended = calibrated_blend(NEURAL, LEXICAL, BANDS, weight=0.5)
    # q1: BM25 min-max a 0, b 1, c 0.5; q2: d 0.75, e 1, f 0
    assert blended["q1"] == pytest.approx({"a": 0.425, "b": 0.7, "c": 0.325})
    assert blended["q2"] == pytest.approx({"d": 0.4625, "e": 0.55, "f": 0.0125})
    # q1 ranks b, a, c; q2 puts e first
    assert ndcg(blended) == pytest.approx((NDCG_Q1_BAC + 1.0) / 2)


def test_calibrated_score_orders_a_calibration_step_by_similarity() -> None:
    # one step: P(grade >= 1) = 1 and P(grade >= 2) = 0 for every similarity in [0.2, 0.8]
    flat = ScoreBands((0, 1, 2), ("irrelevant", "partial", "relevant"), (0.1, 0.9),
                      (((0.0, 0.2, 0.8, 1.0), (0.0, 1.0, 1.0, 1.0)), ((0.0, 0.8, 1.0), (0.0, 0.0, 1.0))))
    scored = calibrated({"q": {"a": 0.3, "b": 0.7, "c": 0.5}}, flat)["q"]
    assert scored == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.5})
    assert sorted(scored, key=scored.get, reverse=True) == ["b", "c", "a"]


def test_untuned_minmax_and_rrf_match_hand_computation() -> None:
    # q2: neural min-max d 1, e 0.5, f 0; with BM25 d 0.875, e 0.75: e drops to second
    fifty = minmax_blend(NEURAL, LEXICAL, weight=0.5)
    assert fifty["q2"] == pytest.approx({"d": 0.875, "e": 0.75, "f": 0.0})
    assert ndcg(fifty) == pytest.approx((NDCG_Q1_BAC + NDCG_Q2_E_SECOND) / 2)
    # RRF (k = 60): BM25 scores q1's a 0, so a has no BM25 rank: q1 b 1/62 + 1/61 > c 1/63 + 1/62 > a 1/61;
    # q2 d 1/61 + 1/62 = e 1/62 + 1/61, ties by id: d, e
    fused = rrf(NEURAL, LEXICAL)
    assert fused["q1"]["b"] == pytest.approx(1 / 62 + 1 / 61) and fused["q1"]["a"] == pytest.approx(1 / 61)
    assert fused["q1"]["c"] == pytest.approx(1 / 63 + 1 / 62)
    assert ndcg(rrf(NEURAL, LEXICAL)) == pytest.approx((NDCG_Q1_BCA + NDCG_Q2_E_SECOND) / 2)
    # a query BM25 finds nothing for keeps the neural order, with no placeholder product in it
    assert list(rrf({"q": {"x": 0.9, "y": 0.5}}, {"q": {"x": 0.0, "y": 0.0}})["q"]) == ["x", "y"]


def test_weight_is_chosen_on_dev_and_applied_to_test() -> None:
    weight, curve = choose_weight(ndcg, lambda w: calibrated_blend(NEURAL, LEXICAL, BANDS, weight=w),
                                  grid=(0.0, 0.5, 1.0))
    # w = 1: neural alone (q1 a, b, c; q2 d, e); w = 0: BM25 alone (q1 b, c, a; q2 e first)
    assert curve[1.0] == pytest.approx((NDCG_Q1_ABC + NDCG_Q2_E_SECOND) / 2)
    assert curve[0.0] == pytest.approx(((1 / L2(3) + 2 / L2(4)) / IDCG_Q1 + 1.0) / 2)
    assert curve[0.5] == pytest.approx((NDCG_Q1_BAC + 1.0) / 2)
    assert weight == 0.5 and curve[0.5] > max(curve[0.0], curve[1.0])
    blends = hybrid_runs({"dev": NEURAL, "test": NEURAL}, {"dev": LEXICAL, "test": LEXICAL}, ndcg, BANDS,
                         grid=(0.0, 0.5, 1.0))
    assert blends.calibrated_weight == 0.5
    assert ndcg(blends.runs["hybrid: calibrated (dev weight)"]) == pytest.approx(curve[0.5])
    assert ndcg(blends.runs["hybrid: min-max 50/50"]) == pytest.approx((NDCG_Q1_BAC + NDCG_Q2_E_SECOND) / 2)


def test_best_weight_on_the_test_queries_bounds_the_dev_choice() -> None:
    ceiling = best_weight_on(NEURAL, LEXICAL, BANDS, QRELS, 2, (0.0, 0.5, 1.0))
    # the calibrated curve of the test above: 0.5 wins; min-max: w = 0 is BM25 alone, the best of its three
    assert ceiling["calibrated"] == {"weight": 0.5, "ndcg@10": pytest.approx((NDCG_Q1_BAC + 1.0) / 2)}
    assert ceiling["minmax"]["weight"] == 0.0
    assert ceiling["minmax"]["ndcg@10"] == pytest.approx(((1 / L2(3) + 2 / L2(4)) / IDCG_Q1 + 1.0) / 2)


def test_best_weight_per_query_takes_each_query_its_own_best_weight() -> None:
    # min-max, grid 0 / 0.5 / 1. q1: w = 1 ranks a, b, c (its best), 0.5 b, a, c, 0 b, c, a.
    # q2: w = 0 puts e first (its best), 0.5 and 1 rank d before e.
    ceiling = best_weight_per_query(NEURAL, LEXICAL, QRELS, (0.0, 0.5, 1.0))
    assert ceiling == {"ndcg@10": pytest.approx((NDCG_Q1_ABC + 1.0) / 2), "share_best_at_half": 0.0}


def test_learned_fusion_learns_a_rule_that_needs_both_scores() -> None:
    # grade 2 only where both systems score high: no single score ranks the graded products first on every query
    rng = np.random.default_rng(0)
    neural, lexical, qrels = {}, {}, {}
    for part in ("dev", "test"):
        neural[part], lexical[part], qrels[part] = {}, {}, {}
        for q in range(60):
            qid = f"{part}{q}"
            similarity, bm25 = rng.uniform(0, 1, 12), rng.uniform(0, 10, 12)
            neural[part][qid] = {f"p{i}": float(s) for i, s in enumerate(similarity)}
            lexical[part][qid] = {f"p{i}": float(b) for i, b in enumerate(bm25)}
            qrels[part][qid] = {f"p{i}": 2 for i in range(12) if similarity[i] > 0.5 and bm25[i] > 5} or {"p0": 1}
    learned = learned_fusion(neural, lexical, qrels, 2)
    fifty = retrieval_metrics(qrels["test"], minmax_blend(neural["test"], lexical["test"], weight=0.5), 2)["ndcg@10"]
    assert learned["n_dev_rows"] == 60 * 12
    assert learned["ndcg@10"] > max(fifty, 0.9)


def test_complete_runs_score_every_candidate_with_both_systems() -> None:
    neural, lexical = complete_runs({"q": {"a": 0.9}}, {"q": {"b": 2.0}},
                                    lambda q, ids: [{"a": 0.9, "b": 0.1}[p] for p in ids],
                                    lambda q, ids: [{"a": 0.5, "b": 2.0}[p] for p in ids])
    assert neural == {"q": {"a": 0.9, "b": 0.1}} and lexical == {"q": {"a": 0.5, "b": 2.0}}


def test_bm25_index_stems_and_scores_a_stopword_only_query_as_zero() -> None:
    import pandas as pd

    from trainer.hybrid import Bm25Index

    index = Bm25Index(pd.DataFrame({"product_id": ["a", "b"], "product_text": ["cordless drills", "fence post"]}))
    assert list(index.run(pd.DataFrame({"query_id": ["q"], "query_text": ["drilling"]}))["q"]) == ["a"]  # stemmed
    assert index.scores("the of and").tolist() == [0.0, 0.0]
    assert index.scores("drill")[0] > 0 == index.scores("drill")[1]
    with pytest.raises(MnrError, match="none of the 2 product texts has a word left"):
        Bm25Index(pd.DataFrame({"product_id": ["a", "b"], "product_text": ["the", "???"]}))


def test_cli_eval_retrieval_hybrid_on_the_catalog(tmp_path) -> None:
    store = Store(tmp_path / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=6, seed=0))
    result = CliRunner().invoke(app, ["--store", str(store.path), "eval-retrieval", "--dataset", "synthetic",
                                      "--holdout", "0.6", "--hybrid", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    systems = {s["system"]: s for s in printed["systems"]}
    assert set(systems) == {"BM25 (bm25s, stemmed)", "neural", "hybrid: calibrated (dev weight)", "hybrid: RRF",
                            "hybrid: min-max 50/50", "hybrid: min-max (dev weight)"}
    assert all(0 < s["ndcg@10"] <= 1 and 0 <= s["recall@100"] <= 1 for s in systems.values())
    curve = {float(w): value for w, value in printed["dev_ndcg@10_by_weight"].items()}
    assert len(curve) == 21 and curve[printed["calibrated_weight"]] == max(curve.values())
    assert printed["n_dev_queries"] > 0 and printed["n_test_queries"] > 0
    assert store.scalar("SELECT count(*) FROM runs WHERE kind = 'eval-hybrid' AND status = 'ok'") == 1
    params = json.loads(store.scalar("SELECT params FROM runs WHERE kind = 'eval-hybrid'"))
    assert {k: params[k] for k in ("scheme", "dataset", "holdout", "seed")} == {
        "scheme": "esci", "dataset": "synthetic", "holdout": 0.6, "seed": 0}


def said(result) -> str:
    """The command's output and error as one line, without the boxes rich draws around usage errors."""
    return " ".join(f"{result.output} {result.exception or ''}".replace("│", " ").split())


def test_cli_eval_retrieval_refuses_what_it_cannot_evaluate(tmp_path) -> None:
    store = Store(tmp_path / "store.duckdb")
    base = ["--store", str(store.path), "eval-retrieval", "--no-record"]
    runner = CliRunner()
    refused = runner.invoke(app, base + ["--no-bm25", "--no-zero-shot"])
    assert refused.exit_code == 2 and "nothing to evaluate" in said(refused)
    refused = runner.invoke(app, base + ["--hybrid", "--no-bm25"])
    assert refused.exit_code == 2 and "--hybrid blends BM25 with a model" in said(refused)
    refused = runner.invoke(app, base + ["--hybrid", "--no-zero-shot"])
    assert refused.exit_code == 2 and "give one, or drop --no-zero-shot" in said(refused)
    assert store.scalar("SELECT count(*) FROM runs WHERE kind LIKE 'eval%'") == 0
    # every held-out pair 'irrelevant': nothing to find, a clear error instead of BM25's crash
    rows = "query,product_id,title,label\n" + "".join(f"query {q},p{q}{i},product {q} {i},irrelevant\n"
                                                         for q in range(12) for i in range(2))
    (tmp_path / "irrelevant.csv").write_text(rows)
    assert runner.invoke(app, ["--store", str(store.path), "ingest", str(tmp_path / "irrelevant.csv")]).exit_code == 0
    failed = runner.invoke(app, base + ["--dataset", "irrelevant", "--holdout", "0.5"])
    assert isinstance(failed.exception, MnrError)
    assert "held-out queries has a pair labelled above 'irrelevant'" in said(failed)


def test_cli_eval_retrieval_says_which_queries_it_left_out(tmp_path) -> None:
    store = Store(tmp_path / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=6, seed=0))
    rows = "query,product_id,title,label\n" + "".join(f"lost query {q},x{q},unrelated thing {q},irrelevant\n"
                                                         for q in range(40))
    (tmp_path / "lost.csv").write_text(rows)
    runner = CliRunner()
    assert runner.invoke(app, ["--store", str(store.path), "ingest", str(tmp_path / "lost.csv"),
                               "--dataset", "synthetic"]).exit_code == 0
    result = runner.invoke(app, ["--store", str(store.path), "eval-retrieval", "--dataset", "synthetic",
                                 "--holdout", "0.5", "--no-zero-shot", "--no-record", "--json"])
    assert result.exit_code == 0, result.output
    (bm25,) = json.loads(result.stdout)
    assert bm25["n_queries_left_out"] > 0
    shown = runner.invoke(app, ["--store", str(store.path), "eval-retrieval", "--dataset", "synthetic",
                                "--holdout", "0.5", "--no-zero-shot", "--no-record"])
    assert f"{int(bm25['n_queries_left_out'])} held-out queries have every pair labelled 'irrelevant'" in said(shown)


def test_condensed_run_drops_unjudged_products_and_scores_by_hand() -> None:
    judged = judged_products(pd.DataFrame({"query_id": ["q1", "q1", "q2"], "product_id": ["a", "b", "c"]}))
    run = {"q1": {"x": 0.9, "a": 0.8, "b": 0.7}, "q2": {"y": 0.5, "z": 0.4}}
    qrels = {"q1": {"a": 2}, "q2": {"c": 1}}
    short = judged_only(run, judged)
    assert short == {"q1": {"a": 0.8, "b": 0.7}, "q2": {}}
    assert judged_share(run, judged) == pytest.approx((2 / 3 + 0 / 2) / 2)
    # full run: q1's only relevant product at rank 2 (1 / log2(3)), q2 finds nothing; condensed: q1 at rank 1
    assert retrieval_metrics(qrels, run, 2)["ndcg@10"] == pytest.approx((1 / math.log2(3) + 0) / 2)
    assert retrieval_metrics(qrels, short, 2)["ndcg@10"] == pytest.approx((1.0 + 0) / 2)


def test_evaluate_systems_condensed_reports_bm25_on_judged_products_only() -> None:
    from labelstore.schemes import load_scheme
    from trainer.data import LabelledPairs
    from trainer.evaluation import JUDGED_SUFFIX, evaluate_systems

    # "red drill": BM25 ranks the unjudged "red drill press" (two query words) above the judged "drill" (one)
    products = pd.DataFrame({"product_id": ["p1", "p2", "p3"],
                             "product_text": ["red drill press", "cordless drill", "garden hose"]})
    frame = pd.DataFrame({"pair_id": ["x"], "dataset": ["d"], "query_id": ["q"], "query_text": ["red drill"],
                          "product_id": ["p2"], "product_text": ["cordless drill"], "label": ["relevant"],
                          "grade": [2], "source": ["human"]})
    reports = {r.system: r for r in evaluate_systems(LabelledPairs(load_scheme("graded3"), frame), products,
                                                     {"BM25": None}, k=3, condensed=True)}
    full, short = reports["BM25"], reports["BM25" + JUDGED_SUFFIX]
    assert list(full.run["q"])[:2] == ["p1", "p2"] and list(short.run["q"]) == ["p2"]
    assert full.metrics["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert short.metrics["ndcg@10"] == pytest.approx(1.0)
    assert full.metrics["judged@10"] == pytest.approx(1 / 2)  # BM25 returns the two products with a query word
    assert "judged@10" not in short.metrics
