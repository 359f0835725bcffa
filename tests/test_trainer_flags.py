"""Policy flags in retrieval evaluation, on a hand-made store whose BM25 rankings and flag counts are worked
out by hand (read through `labelstore.flags`, never the annotator).

Products (title only): p1 cordless drill, p2 cordless drill kit, p3 rifle scope mount, p4 rifle cleaning kit,
p5 garden hose, p6 garden hose reel, p7 drill bits, p8 air rifle.
BM25 (score > 0) retrieves for q1 'cordless drill' {p1, p2, p7}, q2 'rifle' {p3, p4, p8}, q3 'garden hose' {p5, p6}.

Flags (graded3 labels under the marketplace policy, so the esci grades below stay the import's):
p3 prohibited 0.9 (flagged); p2 prohibited 0.1 but a human set it (flagged); p8 prohibited 0.8 but a human
cleared it (not flagged); p4 prohibited 0.3 (flagged only at threshold <= 0.3).
At 0.5: flagged {p2, p3}: q1 1, q2 1, q3 0 in the top 10 -> mean 2/3, total 2. At 0.25 p4 joins: total 3.
Esci grades: q1 p1 exact, p2 exact, p7 complement; q2 p8 exact, p3 and p4 complement; q3 p5 exact, p6 substitute
(and one irrelevant pair per query, which no metric counts).
Recall@100 (exact only) is 1 everywhere; with the flagged excluded q1 loses p2: (0.5 + 1 + 1) / 3.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from app.cli import app
from labelstore import LabelRecord, Store
from labelstore.catalog import Catalog, write_catalog
from labelstore.flags import current_flags, flagged_product_ids, flagged_products
from labelstore.ids import pair_id
from labelstore.schemes import load_scheme
from trainer.data import load_labelled_pairs, load_products
from trainer.evaluation import EXCLUDED_SUFFIX, evaluate_systems, exclude_products, flagged_in_top, truncate_run

TITLES = {"p1": "cordless drill", "p2": "cordless drill kit", "p3": "rifle scope mount", "p4": "rifle cleaning kit",
          "p5": "garden hose", "p6": "garden hose reel", "p7": "drill bits", "p8": "air rifle"}
QUERIES = {"q1": "cordless drill", "q2": "rifle", "q3": "garden hose"}
JUDGED = {"q1": {"p1": "exact", "p2": "exact", "p7": "complement", "p5": "irrelevant"},
          "q2": {"p8": "exact", "p3": "complement", "p4": "complement", "p6": "irrelevant"},
          "q3": {"p5": "exact", "p6": "substitute", "p1": "irrelevant"}}
GRADED3 = load_scheme("graded3")
ESCI = load_scheme("esci")


def pid(short: str) -> str:
    return f"toy:{short}"


def qpair(query: str, product: str) -> str:
    return pair_id(f"toy:{query}", pid(product))


def flag_label(query: str, product: str, probability: float, decision: bool | None = None) -> list[LabelRecord]:
    """An LLM label scoring `prohibited`, and, with `decision`, a human label deciding it."""
    common = dict(pair_id=qpair(query, product), scheme="graded3", label="relevant", grade=GRADED3.grade_of("relevant"))
    records = [LabelRecord(**common, source="llm", author="tiny+none@marketplace:test", confidence=0.9,
                           flags={"prohibited": probability})]
    if decision is not None:
        records.append(LabelRecord(**common, source="human", author="alice", flags={"prohibited": probability},
                                   flag_decisions={"prohibited": decision}))
    return records


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store(tmp_path_factory.mktemp("trainer-flags") / "toy.duckdb")
    products = pd.DataFrame({"product_id": [pid(p) for p in TITLES], "title": list(TITLES.values()),
                             "description": None, "brand": None})
    queries = pd.DataFrame({"query_id": [f"toy:{q}" for q in QUERIES], "text": list(QUERIES.values())})
    judgments = pd.DataFrame([{"query_id": f"toy:{q}", "product_id": pid(p), "label": label,
                               "grade": ESCI.grade_of(label)} for q, judged in JUDGED.items()
                              for p, label in judged.items()])
    write_catalog(store, Catalog(products, queries, judgments), dataset="toy")
    store.add_labels(flag_label("q2", "p3", 0.9) + flag_label("q1", "p2", 0.1, decision=True)
                     + flag_label("q2", "p8", 0.8, decision=False) + flag_label("q2", "p4", 0.3))
    return store


def test_flagged_products_decision_first_then_threshold(store: Store) -> None:
    assert flagged_product_ids(store) == {pid("p2"), pid("p3")}
    assert flagged_product_ids(store, threshold=0.25) == {pid("p2"), pid("p3"), pid("p4")}
    assert flagged_product_ids(store, threshold=0.95) == {pid("p2")}  # a human set it: no threshold applies
    assert flagged_product_ids(store, dataset="other") == frozenset()
    listed = flagged_products(store).set_index("product_id")
    assert listed.loc[pid("p3"), "flags"] == "prohibited" and listed.loc[pid("p3"), "n_pairs"] == 1
    current = current_flags(store, [qpair("q2", "p8")]).iloc[0]
    assert (current["source"], current["probability"], current["decision"], current["flagged"]) == (
        "human", 0.8, False, False)
    with pytest.raises(ValueError, match="threshold"):
        flagged_product_ids(store, threshold=1.5)


def test_flag_counts_and_exclusion_by_hand() -> None:
    run = {"a": {"x": 3.0, "f": 2.0, "y": 1.0}, "b": {"f": 5.0, "g": 4.0}}
    assert flagged_in_top(run, frozenset({"f", "g"})) == {"flagged@10": 1.5, "flagged@10_total": 3.0}
    assert flagged_in_top(run, frozenset({"f"}), k=1) == {"flagged@1": 0.5, "flagged@1_total": 1.0}
    assert exclude_products(run, frozenset({"f"})) == {"a": {"x": 3.0, "y": 1.0}, "b": {"g": 4.0}}
    assert truncate_run(run, 1) == {"a": {"x": 3.0}, "b": {"f": 5.0}}


def held_out_pairs(store: Store):
    return load_labelled_pairs(store, "esci", "toy", ("title",))


def test_evaluate_systems_counts_flagged_in_the_top_10_and_excludes_them(store: Store) -> None:
    products = load_products(store, "toy", ("title",))
    flagged = flagged_product_ids(store)
    reports = {r.system: r for r in evaluate_systems(held_out_pairs(store), products, {"bm25": None},
                                                      flagged=flagged, exclude_flagged=True)}
    assert set(reports) == {"bm25", "bm25" + EXCLUDED_SUFFIX}
    plain, excluded = reports["bm25"].metrics, reports["bm25" + EXCLUDED_SUFFIX].metrics
    assert plain["flagged@10"] == pytest.approx(2 / 3) and plain["flagged@10_total"] == 2
    assert excluded["flagged@10"] == 0 and excluded["flagged@10_total"] == 0
    assert plain["recall@100"] == pytest.approx(1.0) and excluded["recall@100"] == pytest.approx(2.5 / 3)
    assert excluded["ndcg@10"] < plain["ndcg@10"]
    # ranked deep enough that k products are left after filtering: q1 keeps p1 and p7 at k = 2
    shallow = {r.system: r for r in evaluate_systems(held_out_pairs(store), products, {"bm25": None}, k=2,
                                                      flagged=flagged, exclude_flagged=True)}
    assert set(shallow["bm25" + EXCLUDED_SUFFIX].run["toy:q1"]) == {pid("p1"), pid("p7")}
    assert len(shallow["bm25"].run["toy:q1"]) == 2
    # without flags given, no flag metrics
    assert "flagged@10" not in evaluate_systems(held_out_pairs(store), products, {"bm25": None})[0].metrics


def test_cli_eval_retrieval_reports_flags_with_and_without_exclusion(store: Store) -> None:
    base = ["--store", str(store.path), "eval-retrieval", "--dataset", "toy", "--scheme", "esci", "--holdout", "0.99",
            "--no-zero-shot", "--json"]
    result = CliRunner().invoke(app, base + ["--exclude-flagged"])
    assert result.exit_code == 0, result.output
    systems = {s["system"]: s for s in json.loads(result.stdout)}
    assert systems["bm25"]["n_queries"] == 3
    assert systems["bm25"]["flagged@10_total"] == 2 and systems["bm25" + EXCLUDED_SUFFIX]["flagged@10_total"] == 0
    lower = CliRunner().invoke(app, base + ["--flag-threshold", "0.25"])
    assert lower.exit_code == 0, lower.output
    assert [s["flagged@10_total"] for s in json.loads(lower.stdout)] == [3]
    table = CliRunner().invoke(app, base[:-1] + ["--exclude-flagged"])
    assert table.exit_code == 0, table.output
    assert "(flagged excluded)" in table.stdout and "2 products flagged in the catalog" in table.stdout
    params = json.loads(store.scalar("SELECT params FROM runs WHERE kind = 'eval-retrieval' ORDER BY started_at LIMIT 1"))
    assert params["exclude_flagged"] and params["n_flagged_products"] == 2


def test_hybrid_reports_flag_counts_and_excluded_rows(store: Store) -> None:
    from trainer.evaluation import evaluate_hybrid
    from trainer.model import TwoTowerModel

    pairs = held_out_pairs(store)
    products = load_products(store, "toy", ("title",))
    reports, _ = evaluate_hybrid(TwoTowerModel.from_pretrained(), pairs, pairs, products, grid=(0.0, 0.5, 1.0),
                                 flagged=flagged_product_ids(store), exclude_flagged=True)
    by_name = {r.system: r.metrics for r in reports}
    assert len(by_name) == 12  # BM25, neural, four blends; each also with the flagged excluded
    assert by_name["BM25 (bm25s, stemmed)"]["flagged@10_total"] == 2  # the hand count above
    # all 8 products are candidates of the neural side, so each query's top 10 holds every flagged one it ranks
    assert by_name["neural"]["flagged@10_total"] == 2 * 3
    assert all(metrics["flagged@10_total"] == 0 for name, metrics in by_name.items() if name.endswith(EXCLUDED_SUFFIX))


def test_hybrid_excluded_rankings_are_filled_to_k_and_the_plain_ones_unchanged(store: Store) -> None:
    from trainer.evaluation import evaluate_hybrid
    from trainer.model import TwoTowerModel

    pairs = held_out_pairs(store)
    products = load_products(store, "toy", ("title",))
    model = TwoTowerModel.from_pretrained()
    flagged = flagged_product_ids(store)
    reports, info = evaluate_hybrid(model, pairs, pairs, products, k=2, grid=(0.0, 0.5, 1.0),
                                    flagged=flagged, exclude_flagged=True)
    plain, _ = evaluate_hybrid(model, pairs, pairs, products, k=2, grid=(0.0, 0.5, 1.0), flagged=flagged)
    runs = {r.system: r.run for r in reports}
    for name, run in runs.items():
        if name.endswith(EXCLUDED_SUFFIX) and not name.startswith("BM25"):  # BM25 matches fewer than k on some
            assert all(len(ranked) == 2 and not set(ranked) & flagged for ranked in run.values()), name
    before = {r.system: r.run for r in plain}
    assert before["neural"] == runs["neural"]
    # BM25 ties may be cut differently at another depth (and so the blends' candidates); the scores kept are not
    bm25 = "BM25 (bm25s, stemmed)"
    assert {q: sorted(r.values()) for q, r in before[bm25].items()} == {q: sorted(r.values()) for q, r in runs[bm25].items()}
    assert set(info["excluded_weights"]) == {"calibrated", "minmax"}
