"""Stage 1 (label-aware SupCon) and Stage 2 (multi-class circle loss) training loops.

A plain torch loop over graded batches: B queries, up to `products_per_query` of each query's
labelled products, each product once per batch with its grade for every batch query it was judged
for (the (B, N) grade matrix the losses take). Checkpoints every `checkpoint_every` steps into
`<out>/checkpoint/`; a run started again with the same out folder and config resumes from there.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from labelstore.errors import MnrError
from labelstore.ids import stable_hash
from labelstore.store import Store
from trainer.data import DEFAULT_PRODUCT_FIELDS, LabelledPairs, load_labelled_pairs
from trainer.losses import GradedBatchLoss, GradeSupConLoss, MultiClassCircleLoss
from trainer.losses.base import UNJUDGED
from trainer.mining import hard_negatives
from trainer.model import TwoTowerModel

STAGES = ("stage1", "stage2")


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded as the run's params)."""

    stage: str = "stage1"
    scheme: str = "esci"
    dataset: str | None = None
    epochs: int = 1
    max_steps: int | None = None
    queries_per_batch: int = 16
    products_per_query: int = 8
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_seq_length: int = 64
    holdout_fraction: float = 0.2
    seed: int = 0
    product_fields: tuple[str, ...] = DEFAULT_PRODUCT_FIELDS
    separate_towers: bool = False
    temperature: float = 0.05
    product_anchors: bool = False
    gamma: float = 32.0
    margin: float = 0.1
    margins: dict[int, float] = field(default_factory=dict)
    in_batch_negatives: bool = True  # stage 2: other batch queries' products count as the lowest grade
    checkpoint_every: int = 0
    hard_negatives: int = 0
    hard_negative_pool: int = 30
    hard_negative_margin: float | None = 0.05

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise MnrError(f"unknown stage '{self.stage}' (use one of {', '.join(STAGES)})")
        if self.hard_negatives < 0 or (self.hard_negatives and self.hard_negative_pool < self.hard_negatives):
            raise MnrError("hard negatives must be >= 0 and the pool they are drawn from at least as large")
        if self.queries_per_batch < 1 or self.products_per_query < 1:
            raise MnrError("queries per batch and products per query must be at least 1")
        self.product_fields = tuple(self.product_fields)

    def key(self) -> str:
        return stable_hash(json.dumps(asdict(self), sort_keys=True, default=str))


@dataclass
class GradedBatch:
    query_texts: list[str]
    product_texts: list[str]
    query_index: torch.Tensor  # (N,)
    grades: torch.Tensor  # (N,)
    grade_matrix: torch.Tensor  # (B, N), UNJUDGED where a batch query did not judge a product
    weight_matrix: torch.Tensor | None = None  # (B, N) float when the pairs carry a `weight` column


@dataclass
class TrainResult:
    model: TwoTowerModel
    path: Path
    steps: int
    metrics: dict[str, float]


def graded_batches(pairs: pd.DataFrame, queries_per_batch: int, products_per_query: int,
                   rng: random.Random) -> Iterator[GradedBatch]:
    """One epoch of batches over the queries of `pairs` (query_id, query_text, product_id, product_text, grade,
    optionally weight: then each batch has a weight matrix, 1 where unjudged)."""
    judged = {(q, p): int(g) for q, p, g in zip(pairs["query_id"], pairs["product_id"], pairs["grade"])}
    weighted = {(q, p): float(w) for q, p, w in zip(pairs["query_id"], pairs["product_id"], pairs["weight"])} \
        if "weight" in pairs else None
    by_query = {qid: group for qid, group in pairs.groupby("query_id", sort=True)}
    order = sorted(by_query)
    rng.shuffle(order)
    for start in range(0, len(order), queries_per_batch):
        batch_queries = order[start:start + queries_per_batch]
        product_ids: list[str] = []
        product_texts: list[str] = []
        owners: list[int] = []
        for b, qid in enumerate(batch_queries):
            group = by_query[qid]
            rows = rng.sample(range(len(group)), min(products_per_query, len(group)))
            for row in rows:
                pid = group["product_id"].iat[row]
                if pid in product_ids:
                    continue
                product_ids.append(pid)
                product_texts.append(group["product_text"].iat[row])
                owners.append(b)
        matrix = torch.full((len(batch_queries), len(product_ids)), UNJUDGED, dtype=torch.long)
        for b, qid in enumerate(batch_queries):
            for n, pid in enumerate(product_ids):
                matrix[b, n] = judged.get((qid, pid), UNJUDGED)
        weights = None
        if weighted is not None:
            weights = torch.tensor([[weighted.get((qid, pid), 1.0) for pid in product_ids] for qid in batch_queries],
                                   dtype=torch.float32).reshape(len(batch_queries), len(product_ids))
        query_index = torch.tensor(owners, dtype=torch.long)
        yield GradedBatch([by_query[q]["query_text"].iat[0] for q in batch_queries], product_texts, query_index,
                          matrix[query_index, torch.arange(len(product_ids))], matrix, weights)


def build_loss(config: TrainConfig, pairs: LabelledPairs) -> GradedBatchLoss:
    grades = [label.grade for label in pairs.scheme.labels]
    if config.stage == "stage1":
        return GradeSupConLoss(top_grade=max(grades), lowest_grade=min(grades), temperature=config.temperature,
                               product_anchors=config.product_anchors)
    return MultiClassCircleLoss(gamma=config.gamma, margin=config.margin, margins=config.margins,
                                in_batch_grade=min(grades) if config.in_batch_negatives else None)


def with_hard_negatives(model: TwoTowerModel, train_pairs: LabelledPairs, products: pd.DataFrame,
                        config: TrainConfig) -> LabelledPairs:
    """`train_pairs` plus up to `config.hard_negatives` hard negatives per query: the nearest products
    under `model` (as it starts) that the query has no label for and that score at most
    (1 - hard_negative_margin) x its best positive (`trainer.mining.hard_negatives`), as the scheme's lowest grade."""
    lowest = min(train_pairs.scheme.labels, key=lambda label: label.grade)
    mined = hard_negatives(model, train_pairs.frame, products, config.hard_negatives, config.hard_negative_pool,
                           lowest.grade, lowest.name, config.hard_negative_margin)
    return LabelledPairs(train_pairs.scheme, pd.concat([train_pairs.frame, mined], ignore_index=True))


@dataclass
class Relabels:
    """LLM relabels of mined pairs for Stage 2, as arrays: `pair_ids` (n,), `grades` (n,), `weights` (n,) in
    [0, 1] (the labeler's confidence), and `exclude`: pairs kept out of training (sent to review instead)."""

    pair_ids: list[str]
    grades: np.ndarray
    weights: np.ndarray
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.grades, self.weights = np.asarray(self.grades, dtype=int), np.asarray(self.weights, dtype=float)
        if not len(self.pair_ids) == len(self.grades) == len(self.weights):
            raise MnrError(f"relabels: {len(self.pair_ids)} pair ids, {len(self.grades)} grades, {len(self.weights)} weights")
        if len(self.weights) and not ((self.weights >= 0) & (self.weights <= 1)).all():
            raise MnrError("relabel weights must lie in [0, 1]")


def with_relabels(pairs: LabelledPairs, relabels: Relabels) -> LabelledPairs:
    """`pairs` without `relabels.exclude`, with a `weight` column: each relabelled pair's grade and weight
    from `relabels`, weight 1 for every other pair. Relabelled pairs not in `pairs` (other queries) are ignored."""
    frame = pairs.frame[~pairs.frame["pair_id"].isin(set(relabels.exclude))].copy()
    grade = dict(zip(relabels.pair_ids, relabels.grades.tolist()))
    weight = dict(zip(relabels.pair_ids, relabels.weights.tolist()))
    frame["grade"] = [grade.get(p, g) for p, g in zip(frame["pair_id"], frame["grade"])]
    frame["weight"] = frame["pair_id"].map(weight).fillna(1.0).astype(float)
    return LabelledPairs(pairs.scheme, frame.reset_index(drop=True))


def _seed_everything(seed: int) -> random.Random:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return random.Random(seed)


def _schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_model(model: TwoTowerModel, train_pairs: LabelledPairs, config: TrainConfig, out: Path,
                show_progress: bool = True) -> TrainResult:
    """Train `model` in place on `train_pairs`, save it to `out`, return it with timing metrics."""
    if train_pairs.frame.empty:
        raise MnrError("no training pairs left after the held-out split; lower --holdout or add labels")
    rng = _seed_everything(config.seed)
    loss_fn = build_loss(config, train_pairs)
    n_queries = train_pairs.frame["query_id"].nunique()
    steps_per_epoch = -(-n_queries // config.queries_per_batch)
    total_steps = min(config.max_steps or steps_per_epoch * config.epochs, steps_per_epoch * config.epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = _schedule(optimizer, total_steps, config.warmup_fraction)
    checkpoint = out / "checkpoint"
    step, done_pairs, losses = _resume(model, optimizer, scheduler, checkpoint, config)
    model.train(True)
    started = time.perf_counter()
    texts = 0
    with Progress(TextColumn(f"{config.stage}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), disable=not show_progress, transient=True) as progress:
        task = progress.add_task("train", total=total_steps, completed=step, info="")
        batch_number = 0
        for epoch in range(config.epochs):
            for batch in graded_batches(train_pairs.frame, config.queries_per_batch, config.products_per_query, rng):
                batch_number += 1
                if batch_number <= step:
                    continue  # resumed: skip the batches already trained on (same seed, same order)
                if step >= total_steps:
                    break
                optimizer.zero_grad()
                query_emb = model.embed_queries(batch.query_texts)
                product_emb = model.embed_products(batch.product_texts)
                loss = loss_fn(query_emb, product_emb, batch.query_index, batch.grades, batch.grade_matrix,
                               batch.weight_matrix)
                if loss.requires_grad:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                scheduler.step()
                step += 1
                done_pairs += len(batch.product_texts)
                texts += len(batch.product_texts) + len(batch.query_texts)
                losses.append(loss.detach().item())
                progress.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.4f}")
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                    _save_checkpoint(model, optimizer, scheduler, checkpoint, config, step, done_pairs, losses)
    wall = time.perf_counter() - started
    model.train(False)
    model.save(out)
    _clear_checkpoint(checkpoint)
    metrics = {"steps": float(step), "train_pairs_seen": float(done_pairs), "train_wall_s": wall,
               "train_pairs_per_s": (done_pairs / wall) if wall > 0 else 0.0,
               "train_texts_per_s": (texts / wall) if wall > 0 else 0.0,
               "loss_first": losses[0] if losses else float("nan"),
               "loss_last20": float(np.mean(losses[-20:])) if losses else float("nan")}
    return TrainResult(model, out, step, metrics)


def _save_checkpoint(model: TwoTowerModel, optimizer: torch.optim.Optimizer, scheduler, checkpoint: Path,
                     config: TrainConfig, step: int, done_pairs: int, losses: list[float]) -> None:
    tmp = checkpoint.with_name("checkpoint.tmp")
    model.save(tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "done_pairs": done_pairs, "losses": losses, "config_key": config.key()}, tmp / "state.pt")
    _clear_checkpoint(checkpoint)
    tmp.rename(checkpoint)


def _resume(model: TwoTowerModel, optimizer, scheduler, checkpoint: Path, config: TrainConfig) -> tuple[int, int, list[float]]:
    state_path = checkpoint / "state.pt"
    if not state_path.is_file():
        return 0, 0, []
    state = torch.load(state_path, weights_only=False)
    if state.get("config_key") != config.key():
        return 0, 0, []
    saved = TwoTowerModel.from_pretrained(checkpoint / "model")
    model.query_encoder.load_state_dict(saved.query_encoder.state_dict())
    model.product_encoder.load_state_dict(saved.product_encoder.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), int(state["done_pairs"]), list(state["losses"])


def _clear_checkpoint(checkpoint: Path) -> None:
    import shutil

    if checkpoint.exists():
        shutil.rmtree(checkpoint)


def default_out(store: Store, stage: str, run_id: str) -> Path:
    """models/<stage>-<run id> next to the store file."""
    return store.path.resolve().parent / "models" / f"{stage}-{run_id}"


def run_training(store: Store, config: TrainConfig, *, start_from: str | Path | None = None,
                 parent_model_id: str | None = None, out: Path | None = None, evaluate: bool = True,
                 show_progress: bool = True, relabels: Relabels | None = None) -> tuple[str, TrainResult]:
    """Load labels, train, evaluate on the held-out queries, save and register. Returns (model_id, result).

    Stage 2 must start from a model (`start_from`, usually a Stage 1 model); Stage 1 starts from it
    when given, else from all-MiniLM-L6-v2. Trains on the store's *current* labels, so LLM relabels of
    mined pairs (and human corrections) are included; `relabels` (Stage 2) gives them their weights and
    keeps the excluded ones out (see `with_relabels`).
    """
    from trainer.evaluation import evaluate_systems
    from trainer.data import load_products

    if config.stage == "stage2" and start_from is None:
        raise MnrError("stage2 starts from a trained model: pass --from MODEL_ID (usually a stage1 model)")
    if relabels is not None and config.stage != "stage2":
        raise MnrError("weighted LLM relabels train Stage 2 only")
    pairs = load_labelled_pairs(store, config.scheme, config.dataset, config.product_fields)
    train_pairs, held_out = pairs.split(config.holdout_fraction, config.seed)
    params = {**asdict(config), "start_from": str(start_from) if start_from else "all-MiniLM-L6-v2",
              "parent_model_id": parent_model_id, "n_train_pairs": len(train_pairs), "n_heldout_pairs": len(held_out),
              "data_hash": pairs.data_hash()}
    with store.run("train", params) as run:
        model = TwoTowerModel.from_pretrained(start_from, separate_towers=config.separate_towers,
                                              product_fields=config.product_fields, max_seq_length=config.max_seq_length)
        out = Path(out) if out is not None else default_out(store, config.stage, run.run_id)
        products = load_products(store, config.dataset, config.product_fields) if config.hard_negatives or evaluate else None
        n_labelled = len(train_pairs)
        if config.hard_negatives:
            train_pairs = with_hard_negatives(model, train_pairs, products, config)
        relabel_metrics = {}
        if relabels is not None:  # after the hard negatives, so an excluded pair never comes back as one
            before = len(train_pairs)
            train_pairs = with_relabels(train_pairs, relabels)
            used = train_pairs.frame["pair_id"].isin(set(relabels.pair_ids))
            relabel_metrics = {"relabelled_pairs": float(used.sum()), "relabels_excluded": float(before - len(train_pairs)),
                               "relabel_weight_mean": float(train_pairs.frame.loc[used, "weight"].mean()) if used.any() else 0.0}
            n_labelled -= int(relabel_metrics["relabels_excluded"])
        result = train_model(model, train_pairs, config, out, show_progress)
        metrics = {**result.metrics, "hard_negatives_added": float(len(train_pairs) - n_labelled), **relabel_metrics}
        if evaluate and len(held_out):
            report = evaluate_systems(held_out, products, {config.stage: model})[0]
            metrics.update({f"heldout_{k}": v for k, v in report.metrics.items()})
            metrics.update({f"heldout_auc_{k}": v for k, v in report.adjacent_auc.items()})
        model_id = f"retriever-{config.stage}-{stable_hash(run.run_id, length=10)}"
        store.register_model(model_id, "retriever", result.path, stage=config.stage, parent_model_id=parent_model_id,
                             data_hash=pairs.data_hash(), metrics=metrics, run_id=run.run_id)
        run.metrics.update({**metrics, "model_id": model_id, "path": str(result.path)})
    result.metrics = metrics
    return model_id, result
