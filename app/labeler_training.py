"""Fine-tuning the labeler from the store, shared by `mnr finetune` and the loop's `finetune` step.

`finetune_data` reads the labels, splits them by query into train and dev and subsamples them;
`run_finetune` trains the adapter (`annotator.finetune.finetune`), records the run and registers the
adapter in `models`; `agreement` and `baseline_probs` compare a labeler and the text baseline fitted on
the same training labels on held-out pairs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from annotator.prompts import Policy
from labelstore.errors import MnrError
from labelstore.schemes import LabelScheme
from labelstore.store import Store

if TYPE_CHECKING:  # torch: imported when a run starts, not when the CLI loads
    from annotator.finetune import FinetuneArgs, FinetuneResult
    from annotator.stack import RetrieverCosine

ADAPTER_KIND = "labeler-adapter"


class NoTrainingLabels(MnrError):
    """The store has no labels to fine-tune on (of the policy's scheme, from the sources asked for)."""


@dataclass
class FinetuneData:
    """The policy and the query-disjoint train / dev pairs one fine-tuning run learns from."""

    policy: Policy
    sources: list[str]
    train: pd.DataFrame
    dev: pd.DataFrame

    @property
    def data_hash(self) -> str:
        """The hash `finetune` records in meta.json for these pairs (train and dev together)."""
        from annotator.finetune import data_hash

        return data_hash(pd.concat([self.train, self.dev]))


def rating_scale_for(frame: pd.DataFrame, scheme: LabelScheme) -> tuple[float, float] | None:
    """The raw-rating scale of the pairs' dataset, when they come from one dataset the scheme maps."""
    datasets = frame["dataset"].dropna().unique()
    if len(datasets) == 1 and datasets[0] in scheme.rating_maps and frame["raw_rating"].notna().any():
        low, high = scheme.rating_maps[datasets[0]].scale
        return float(low), float(high)
    return None


def finetune_data(store: Store, policy: str | Policy, sources: Sequence[str], args: FinetuneArgs, *,
                  keep: Callable[[pd.DataFrame], pd.Series] | None = None) -> FinetuneData:
    """The store's labels of the policy's scheme from `sources` (rows where `keep` is True), split into train /
    dev (`args.dev_fraction`, by query or by pair: `args.dev_split`) and subsampled (`args.max_train`,
    `args.max_dev`)."""
    from annotator.evaluation import labelled_pairs
    from annotator.finetune import split_dev, subsample
    from annotator.prompts import load_prompt_policy

    loaded = policy if isinstance(policy, Policy) else load_prompt_policy(policy)
    scheme = loaded.scheme
    frame = with_flag_decisions(store, labelled_pairs(store, scheme.name, list(sources)), scheme.name,
                                loaded.flag_names)
    if keep is not None:
        frame = frame[keep(frame)].reset_index(drop=True)
    if frame.empty:
        raise NoTrainingLabels(f"the store has no labels of scheme '{scheme.name}' (policy '{loaded.name}') from "
                       f"source(s) {', '.join(sources)}; add human labels in the review app, or pass "
                       "--sources human,import to train on an ingested human-rated dataset")
    train, dev = split_dev(frame, args.dev_fraction, args.seed, by=args.dev_split)
    train, dev = subsample(train, args.max_train, args.seed), subsample(dev, args.max_dev, args.seed)
    return FinetuneData(loaded, list(sources), train, dev)


def with_flag_decisions(store: Store, frame: pd.DataFrame, scheme: str, flag_names: Sequence[str]) -> pd.DataFrame:
    """``frame`` (with column pair_id) and a column ``flags``: per pair its current human decisions (view
    `current_flags`: the newest live one per flag, whichever label carried it) on the flags ``flag_names`` (the
    policy's; a decision on a flag it no longer declares cannot be learnt), flag name -> True (set) / False
    (cleared), or None when none was made; `finetune` learns them."""
    from labelstore.sqlfiles import sql

    decisions = store.df(sql("labelstore", "pair_flag_decisions"),
                         {"scheme": scheme, "pair_ids": [str(p) for p in frame["pair_id"]]})
    by_pair: dict[str, dict[str, bool]] = {}
    for row in decisions[decisions["flag"].isin(list(flag_names))].itertuples(index=False):
        by_pair.setdefault(str(row.pair_id), {})[str(row.flag)] = bool(row.decision)
    return frame.assign(flags=[by_pair.get(str(pair_id)) for pair_id in frame["pair_id"]])


def run_finetune(store: Store, data: FinetuneData, model: str, out: Path, args: FinetuneArgs, *,
                 progress: Callable[[dict[str, Any]], None] | None = None, resume: bool = False,
                 started_at: float | None = None, retriever: RetrieverCosine | None = None,
                 ) -> tuple[FinetuneResult, str]:
    """Train an adapter on `data` into `out` as a 'finetune' run; returns the result and its model id.
    ``retriever``: its cosine becomes an input of the stack (`annotator.stack`)."""
    from annotator.finetune import finetune
    from annotator.models import resolve_model

    model_dir = resolve_model(model)
    params = {"policy": data.policy.name, "policy_hash": data.policy.version, "model": model, "out": str(out),
              "sources": data.sources, "args": args.record(),
              "retriever": retriever.name if retriever is not None else None}
    with store.run("finetune", params) as run:
        result = finetune(data.train, data.dev, data.policy, model_dir, out, args, base_model_name=model,
                          rating_scale=rating_scale_for(data.dev, data.policy.scheme), progress=progress,
                          resume=resume, started_at=started_at, stack_cosine=retriever, label_sources=data.sources)
        meta = result.meta
        run.metrics.update({"dev": meta["dev_metrics"], "temperature": meta["temperature"], "steps": meta["steps"],
                            "stop_reason": meta["stop_reason"], "train_seconds": meta["train_seconds"],
                            "stack": (meta.get("stack") or {}).get("version")})
        model_id = store.register_model(f"labeler-lora-{run.run_id}", ADAPTER_KIND, Path(out).resolve(), stage="lora",
                                        parent_model_id=model, data_hash=meta["data_hash"],
                                        metrics=meta["dev_metrics"], run_id=run.run_id)
    return result, model_id


def agreement(probs: np.ndarray, reference: pd.DataFrame, scheme: LabelScheme,
              chosen: np.ndarray | None = None) -> dict[str, float]:
    """QWK (quadratic-weighted Cohen's kappa on grades), accuracy and macro-F1 of the labels ``chosen`` ((n,)
    label indices; default the most probable) from label probabilities (n, K in scheme order) against the
    `label` column of `reference`."""
    from annotator.evaluation import evaluate_labels

    names = scheme.label_names
    y_true = np.array([names.index(label) for label in reference["label"]])
    metrics = evaluate_labels(y_true, probs, [scheme.grades[name] for name in names], label_names=names,
                              chosen=chosen)
    return {key: round(float(metrics[key]), 4) for key in ("qwk", "accuracy", "macro_f1")}


def baseline_probs(train: pd.DataFrame, test: pd.DataFrame, scheme: LabelScheme) -> np.ndarray:
    """The text baseline (`annotator.text_baseline`) fitted on `train`'s labels, scoring `test`."""
    from annotator.text_baseline import tfidf_linear_probs

    names = scheme.label_names
    return tfidf_linear_probs(train, test, np.array([names.index(label) for label in train["label"]]),
                              len(names))


def label_counts(chosen: np.ndarray, scheme: LabelScheme) -> dict[str, int]:
    """How many pairs got each label, from (n,) label indices ``chosen`` (labels never chosen left out)."""
    return {name: int((chosen == i).sum()) for i, name in enumerate(scheme.label_names) if (chosen == i).any()}

