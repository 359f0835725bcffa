"""Relabelled mined pairs enter Stage 2 with the LLM's grade and confidence as weight; low-confidence ones
are queued for review and not trained on (`mnr mine` -> LLM labels -> `mnr train stage2 --relabelled`)."""
from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from app.relabel import relabelled_mined_pairs
from labelstore import Store
from labelstore.catalog import generate_catalog, write_catalog
from labelstore.store import LabelRecord
from trainer.data import is_held_out, load_labelled_pairs
from trainer.losses import GradeSupConLoss, MultiClassCircleLoss
from trainer.train import graded_batches, with_relabels

HOLDOUT = 0.3
FLOOR = 0.6


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A catalog store after `mnr mine` (zero-shot), with LLM labels on six mined pairs of training queries:
    three confident (0.9, 0.8, 0.7), three not (0.5, 0.3, 0.1)."""
    store = Store(tmp_path_factory.mktemp("relabel") / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=6, seed=0))
    result = CliRunner().invoke(app, ["--store", str(store.path), "mine", "--model", "zero-shot", "--dataset",
                                      "synthetic", "--top-k", "20", "--per-query", "3"])
    assert result.exit_code == 0, result.output
    mined = store.df("SELECT pair_id, query_id FROM pairs WHERE origin = 'mined' ORDER BY pair_id")
    mined = mined[~is_held_out(mined["query_id"], HOLDOUT, 0)].head(6)
    assert len(mined) == 6, "the catalog should give six mined pairs of training queries"
    confidences = [0.9, 0.8, 0.7, 0.5, 0.3, 0.1]
    grades = [3, 2, 0, 3, 2, 0]
    names = {3: "exact", 2: "substitute", 0: "irrelevant"}
    store.add_labels([LabelRecord(p, "esci", names[g], g, "llm", "test-labeler", confidence=c)
                      for p, g, c in zip(mined["pair_id"], grades, confidences)])
    return {"store": store, "pairs": mined["pair_id"].tolist(), "confidences": confidences, "grades": grades}


def test_confident_relabels_train_with_their_weight_and_the_rest_are_queued(relabelled: dict) -> None:
    store, pairs = relabelled["store"], relabelled["pairs"]
    relabels, queued = relabelled_mined_pairs(store, "esci", "synthetic", floor=FLOOR)
    assert queued == 3 and sorted(relabels.exclude) == sorted(pairs[3:])
    assert dict(zip(relabels.pair_ids, relabels.weights)) == pytest.approx(dict(zip(pairs[:3], [0.9, 0.8, 0.7])))
    queue = store.df("SELECT pair_id, reason, priority FROM open_review_queue")
    assert sorted(queue["pair_id"]) == sorted(pairs[3:])
    assert all(reason.startswith("relabel: low confidence") for reason in queue["reason"])

    train, _ = load_labelled_pairs(store, "esci", "synthetic").split(HOLDOUT, 0)
    assert set(pairs) <= set(train.frame["pair_id"]), "the LLM labels are current labels of training queries"
    trained = with_relabels(train, relabels).frame.set_index("pair_id")
    assert not set(pairs[3:]) & set(trained.index), "low-confidence relabels are not trained on"
    assert trained.loc[pairs[:3], "weight"].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert trained.loc[pairs[:3], "grade"].tolist() == relabelled["grades"][:3]
    assert (trained.drop(index=pairs[:3])["weight"] == 1.0).all()



def test_batches_carry_each_judged_entry_weight() -> None:
    frame = pd.DataFrame({"query_id": ["q1", "q1", "q2", "q2"], "query_text": ["drill", "drill", "saw", "saw"],
                          "product_id": ["a", "b", "b", "c"], "product_text": ["A", "B", "B", "C"],
                          "grade": [2, 0, 1, 2], "weight": [1.0, 0.7, 0.9, 1.0]})
    batch = next(graded_batches(frame, 2, 10, random.Random(0)))
    order = {text: n for n, text in enumerate(batch.product_texts)}
    rows = {text: b for b, text in enumerate(batch.query_texts)}
    weights = {(q, p): float(batch.weight_matrix[rows[q], order[p]]) for q in rows for p in order}
    # judged entries carry their weight, unjudged ones 1
    assert weights == pytest.approx({("drill", "A"): 1.0, ("drill", "B"): 0.7, ("drill", "C"): 1.0,
                                     ("saw", "A"): 1.0, ("saw", "B"): 0.9, ("saw", "C"): 1.0})
    assert next(graded_batches(frame.drop(columns="weight"), 2, 10, random.Random(0))).weight_matrix is None


def test_circle_loss_weights_each_violation_by_its_pairs_weights() -> None:
    loss = MultiClassCircleLoss(gamma=8.0, margin=0.1, in_batch_grade=None)
    sims = torch.tensor([[0.5, 0.7, 0.1]])  # the grade-0 product at 0.7 outscores the grade-2 one
    grade = torch.tensor([[2, 0, 0]])
    valid = torch.ones_like(grade, dtype=torch.bool)
    full = loss.loss_from_similarities(sims, grade, valid)
    dropped = loss.loss_from_similarities(sims[:, [0, 2]], grade[:, [0, 2]], valid[:, [0, 2]])
    zero = loss.loss_from_similarities(sims, grade, valid, torch.tensor([[1.0, 0.0, 1.0]]))
    half = loss.loss_from_similarities(sims, grade, valid, torch.tensor([[1.0, 0.5, 1.0]]))
    assert float(zero) == pytest.approx(float(dropped)) and float(dropped) < float(half) < float(full)
    assert float(loss.loss_from_similarities(sims, grade, valid, torch.ones(1, 3))) == pytest.approx(float(full))
    query, products = torch.nn.functional.normalize(torch.randn(1, 4), dim=-1), torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="does not take pair weights"):
        GradeSupConLoss(top_grade=2, lowest_grade=0)(query, products, torch.zeros(3, dtype=torch.long),
                                                     torch.tensor([2, 0, 0]), None, torch.ones(1, 3))


def test_cli_stage2_relabelled_trains_on_the_confident_ones(relabelled: dict) -> None:
    store = relabelled["store"]
    result = CliRunner().invoke(app, ["--store", str(store.path), "train", "stage2", "--from", "zero-shot",
                                      "--dataset", "synthetic", "--holdout", str(HOLDOUT), "--max-steps", "1",
                                      "--max-seq-length", "24", "--relabelled", "--confidence-floor", str(FLOOR)])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.stdout.split())
    assert "3 at confidence >= 0.60" in printed and "3 below it queued" in printed, printed
    metrics = json.loads(store.scalar("SELECT metrics FROM runs WHERE kind = 'train' AND status = 'ok'"))
    assert metrics["relabelled_pairs"] == 3 and metrics["relabels_excluded"] == 3
    assert metrics["relabel_weight_mean"] == pytest.approx(0.8)
    result = CliRunner().invoke(app, ["--store", str(store.path), "train", "stage1", "--dataset", "synthetic",
                                      "--max-steps", "1", "--relabelled"])
    assert "Stage 2 only" in str(result.exception)
