"""Read-side helpers over policy flags (`label_flags`, view `current_flags`, migration 0010).

A flag's state is about the pair, not one label (view `current_flags`): the newest live human decision (set or
cleared) when one was made, else the newest LLM label's probability at or above a threshold. Flags are about
the product, not the query: per product, the newest decision on any of its pairs decides, else any pair's
probability at the threshold flags it.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from labelstore.sqlfiles import sql
from labelstore.store import Store

DEFAULT_THRESHOLD = 0.5
CURRENT_FLAG_COLUMNS = ["pair_id", "scheme", "label_id", "source", "flag", "probability", "decision", "flagged"]


def check_threshold(threshold: float) -> float:
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"a flag threshold is a probability in [0, 1], not {threshold!r}")
    return float(threshold)


def current_flags(store: Store, pair_ids: Sequence[str] | None = None, *, scheme: str | None = None,
                  threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """The current flags of `pair_ids` (None: every pair), one row per (pair, scheme, flag): columns
    `CURRENT_FLAG_COLUMNS`, `flagged` at `threshold`. A pair no label scored or decided a flag on has no rows."""
    return store.df(sql("labelstore", "flags_current"), {
        "threshold": check_threshold(threshold), "pair_ids": None if pair_ids is None else list(pair_ids),
        "scheme": scheme})


def flags_of_labels(store: Store, label_ids: Sequence[int]) -> dict[int, dict[str, tuple[float | None, bool | None]]]:
    """{label_id: {flag: (probability, decision)}} for the labels that carry flags."""
    rows = store.fetchall(sql("labelstore", "flags_of_labels"), {"label_ids": [int(i) for i in label_ids]})
    flags: dict[int, dict[str, tuple[float | None, bool | None]]] = {}
    for label_id, flag, probability, decision in rows:
        flags.setdefault(int(label_id), {})[flag] = (probability, decision)
    return flags


def flagged_products(store: Store, *, threshold: float = DEFAULT_THRESHOLD, dataset: str | None = None) -> pd.DataFrame:
    """Flagged products (the newest human decision on any of their pairs, else a pair's probability at
    `threshold`): columns product_id, flags (comma-separated names), n_pairs (pairs whose own state is
    flagged). `dataset` narrows to one dataset's pairs."""
    return store.df(sql("labelstore", "flagged_products"),
                    {"threshold": check_threshold(threshold), "dataset": dataset})


def flagged_product_ids(store: Store, *, threshold: float = DEFAULT_THRESHOLD,
                        dataset: str | None = None) -> frozenset[str]:
    """The ids of `flagged_products`."""
    return frozenset(flagged_products(store, threshold=threshold, dataset=dataset)["product_id"])
