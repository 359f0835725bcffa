"""Retriever models in the store: resolve ids to folders, register the zero-shot base, compare, promote."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from labelstore.errors import MnrError
from labelstore.store import Store
from trainer.model import ZERO_SHOT_MODEL_ID, base_model_path

if TYPE_CHECKING:
    from trainer.bands import ScoreBands

DEFAULT_METRIC = "heldout_ndcg@10"


def ensure_zero_shot(store: Store) -> str:
    """Register all-MiniLM-L6-v2 as the zero-shot retriever (idempotent); returns its model id."""
    if store.scalar("SELECT count(*) FROM models WHERE model_id = ?", [ZERO_SHOT_MODEL_ID]) == 0:
        store.register_model(ZERO_SHOT_MODEL_ID, "retriever", base_model_path(), stage="zero-shot")
    return ZERO_SHOT_MODEL_ID


def model_row(store: Store, model_id: str) -> dict:
    rows = store.df("SELECT * FROM models WHERE model_id = ?", [model_id])
    if rows.empty:
        known = [r[0] for r in store.fetchall("SELECT model_id FROM models WHERE kind = 'retriever' ORDER BY created_at DESC LIMIT 10")]
        raise MnrError(f"{store.path}: no model '{model_id}' (retrievers: {', '.join(known) or 'none yet; run mnr train stage1'})")
    row = rows.iloc[0].to_dict()
    row["metrics"] = json.loads(row["metrics"]) if row.get("metrics") else {}
    return row


def resolve_model(store: Store, model: str) -> tuple[str | None, Path]:
    """(model_id or None, folder) for a registered model id, 'zero-shot', 'latest-stage1' / 'latest-stage2', or a folder."""
    if model == "zero-shot":
        model = ensure_zero_shot(store)
    elif model in ("latest-stage1", "latest-stage2"):
        found = store.scalar("SELECT model_id FROM models WHERE kind = 'retriever' AND stage = ? "
                             "ORDER BY created_at DESC LIMIT 1", [model.split("-", 1)[1]])
        if found is None:
            raise MnrError(f"{store.path}: no {model.split('-', 1)[1]} retriever yet")
        model = found
    elif Path(model).is_dir():
        return None, Path(model)
    row = model_row(store, model)
    return model, Path(row["path"])


def training_split(store: Store, model_id: str) -> dict | None:
    """{'holdout', 'seed'} of the training run that made `model_id` (its held-out queries are the ones
    `mnr eval-retrieval` and `mnr bands` should use); None for a model no `mnr train` run made."""
    params = store.scalar("SELECT r.params FROM models m JOIN runs r ON r.run_id = m.run_id "
                          "WHERE m.model_id = ? AND r.kind = 'train'", [model_id])
    if not params:
        return None
    config = json.loads(params)
    return {"holdout": config.get("holdout_fraction"), "seed": config.get("seed")}


def split_mismatch(store: Store, model_id: str | None, *, holdout: float, seed: int) -> str | None:
    """Why held-out queries drawn with (holdout, seed) may include queries `model_id` trained on (a larger share, or
    another seed, than its training run held out: `trainer.data.is_held_out`); None when they cannot, or when the
    model has no training run."""
    trained = training_split(store, model_id) if model_id else None
    if trained is None or trained["holdout"] is None:
        return None
    if trained["seed"] == seed and holdout <= trained["holdout"]:
        return None
    return (f"{model_id} held out {trained['holdout']:g} of the queries with seed {trained['seed']} in training; "
            f"--holdout {holdout:g} --seed {seed} takes in queries it trained on")


def compare_models(store: Store, candidate_id: str, baseline_id: str, metric: str = DEFAULT_METRIC,
                   min_gain: float = 0.0) -> bool:
    """True when the candidate's `metric` (from models.metrics) beats the baseline's by more than `min_gain`."""
    candidate = model_row(store, candidate_id)["metrics"].get(metric)
    baseline = model_row(store, baseline_id)["metrics"].get(metric)
    if candidate is None or baseline is None:
        raise MnrError(f"cannot compare {candidate_id} and {baseline_id}: metric '{metric}' missing "
                       "(evaluate both with mnr eval-retrieval --record)")
    return float(candidate) > float(baseline) + min_gain


def promote(store: Store, model_id: str) -> None:
    """Mark `model_id` as the promoted retriever (and no other)."""
    model_row(store, model_id)
    with store.transaction() as con:
        con.execute("UPDATE models SET promoted = false WHERE kind = 'retriever' AND model_id <> ?", [model_id])
        con.execute("UPDATE models SET promoted = true WHERE model_id = ?", [model_id])


def promoted_model(store: Store) -> str | None:
    return store.scalar("SELECT model_id FROM models WHERE kind = 'retriever' AND promoted ORDER BY created_at DESC LIMIT 1")


def record_metrics(store: Store, model_id: str, metrics: dict) -> None:
    """Merge `metrics` into the model's metrics JSON."""
    row = model_row(store, model_id)
    merged = {**row["metrics"], **metrics}
    store.execute("UPDATE models SET metrics = ? WHERE model_id = ?", [json.dumps(merged, sort_keys=True, default=str), model_id])


BANDS_KEY = "score_bands"


def save_bands(store: Store, model_id: str, bands: ScoreBands, report: dict) -> None:
    """Store fitted score bands (and their report) with the model, in its metrics JSON."""
    record_metrics(store, model_id, {BANDS_KEY: bands.to_dict(), f"{BANDS_KEY}_report": report})


def load_bands(store: Store, model_id: str) -> ScoreBands:
    """The score bands stored with `model_id` (`mnr bands --model` fits them)."""
    from trainer.bands import ScoreBands

    stored = model_row(store, model_id)["metrics"].get(BANDS_KEY)
    if stored is None:
        raise MnrError(f"{store.path}: model '{model_id}' has no score bands yet; run mnr bands --model {model_id}")
    return ScoreBands.from_dict(stored)
