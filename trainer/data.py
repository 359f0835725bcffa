"""Training and evaluation data from the store: labelled pairs with query text, product text and grade.

Splits are query-disjoint and deterministic: a query is held out when the stable hash of
(seed, query_id) falls below `holdout_fraction`, so `mnr train` and `mnr eval-retrieval` agree on
the split without storing it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from labelstore.errors import MnrError
from labelstore.ids import stable_hash
from labelstore.schemes import LabelScheme, load_scheme
from labelstore.store import Store

DEFAULT_PRODUCT_FIELDS = ("title", "description")
PRODUCT_FIELDS = ("title", "description", "brand", "attributes")

# Current labels of one scheme joined with query and product text; dataset filter optional.
LABELLED_PAIRS_SQL = """
SELECT c.pair_id, p.dataset, p.query_id, q.text AS query_text, q.synthetic, p.product_id, p.origin,
       pr.title, pr.description, pr.brand, pr.attributes, c.label, c.grade, c.source
FROM current_labels c
JOIN pairs p ON p.pair_id = c.pair_id
JOIN queries q ON q.query_id = p.query_id
JOIN products pr ON pr.product_id = p.product_id
WHERE c.scheme = $scheme AND ($dataset IS NULL OR p.dataset = $dataset)
ORDER BY c.pair_id
"""

PRODUCTS_SQL = """
SELECT product_id, title, description, brand, attributes FROM products
WHERE $dataset IS NULL OR dataset = $dataset ORDER BY product_id
"""

QUERIES_SQL = """
SELECT query_id, text AS query_text, synthetic FROM queries
WHERE $dataset IS NULL OR dataset = $dataset ORDER BY query_id
"""


class TrainerDataError(MnrError):
    """The store holds no usable data for the requested scheme and dataset."""


@dataclass
class LabelledPairs:
    """Labelled pairs of one scheme: columns pair_id, dataset, query_id, query_text, product_id,
    product_text, label, grade, source (one row per pair, its current label)."""

    scheme: LabelScheme
    frame: pd.DataFrame

    def data_hash(self) -> str:
        """A hash of (pair_id, grade) over all rows: two trainings on the same labels share it."""
        return stable_hash(*(f"{p}={g}" for p, g in zip(self.frame["pair_id"], self.frame["grade"])), length=24)

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple["LabelledPairs", "LabelledPairs"]:
        """(train, held-out), disjoint by query."""
        held_out = is_held_out(self.frame["query_id"], holdout_fraction, seed)
        return (LabelledPairs(self.scheme, self.frame[~held_out].reset_index(drop=True)),
                LabelledPairs(self.scheme, self.frame[held_out].reset_index(drop=True)))

    def __len__(self) -> int:
        return len(self.frame)


def is_held_out(query_ids: pd.Series, holdout_fraction: float, seed: int = 0, *, salt: str = "split") -> pd.Series:
    """Boolean Series: True for queries in the held-out part (stable hash of salt, seed and query id;
    another `salt` gives a split independent of the train / held-out one)."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise TrainerDataError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    buckets = query_ids.map(lambda q: int(stable_hash(salt, seed, q, length=8), 16) / 16**8)
    return buckets < holdout_fraction


def check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    unknown = [f for f in fields if f not in PRODUCT_FIELDS]
    if unknown or not fields:
        raise TrainerDataError(f"unknown product field(s) {unknown or fields!r}; choose from {', '.join(PRODUCT_FIELDS)}")
    return tuple(fields)


def product_text(row: dict | pd.Series, fields: Sequence[str] = DEFAULT_PRODUCT_FIELDS) -> str:
    """The text a product is embedded from: the non-empty `fields`, joined by ' | '.

    `attributes` (a JSON object) contributes 'key: value' pairs.
    """
    parts = []
    for name in fields:
        value = row.get(name)
        if value is None or (isinstance(value, float) and pd.isna(value)) or str(value).strip() == "":
            continue
        if name == "attributes":
            try:
                value = "; ".join(f"{k}: {v}" for k, v in json.loads(value).items())
            except (ValueError, AttributeError):
                pass
        parts.append(str(value).strip())
    return " | ".join(parts)


def with_product_text(frame: pd.DataFrame, fields: Sequence[str]) -> pd.DataFrame:
    fields = check_fields(fields)
    texts = [product_text(row, fields) for row in frame[list(PRODUCT_FIELDS)].to_dict("records")]
    return frame.assign(product_text=texts)


def load_labelled_pairs(store: Store, scheme: str, dataset: str | None = None,
                        fields: Sequence[str] = DEFAULT_PRODUCT_FIELDS) -> LabelledPairs:
    """Every pair with a current label of `scheme` (optionally of one dataset), with texts and grade."""
    scheme_obj = load_scheme(scheme)
    frame = store.df(LABELLED_PAIRS_SQL, {"scheme": scheme_obj.name, "dataset": dataset})
    if frame.empty:
        where = f" in dataset '{dataset}'" if dataset else ""
        raise TrainerDataError(f"{store.path}: no pairs labelled with scheme '{scheme}'{where}; "
                               "ingest labels first (mnr ingest) or pick another --scheme/--dataset")
    frame = with_product_text(frame, fields)
    frame["grade"] = frame["grade"].astype(int)
    return LabelledPairs(scheme_obj, frame)


def load_products(store: Store, dataset: str | None, fields: Sequence[str] = DEFAULT_PRODUCT_FIELDS) -> pd.DataFrame:
    """All products of a dataset: product_id, product_text (and the raw fields)."""
    frame = store.df(PRODUCTS_SQL, {"dataset": dataset})
    if frame.empty:
        raise TrainerDataError(f"{store.path}: no products" + (f" in dataset '{dataset}'" if dataset else ""))
    return with_product_text(frame, fields)


def load_queries(store: Store, dataset: str | None) -> pd.DataFrame:
    """All queries of a dataset: query_id, query_text, synthetic."""
    return store.df(QUERIES_SQL, {"dataset": dataset})
