"""The review queue: which (pair, scheme) items an annotator should see, best first.

The priority rules live in `sql/queue.sql`; this module binds its parameters and reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from app.review.settings import ReviewSettings
from labelstore.sqlfiles import sql
from labelstore.store import Store

# Queue sources in priority order (the SQL's tiers).
QUEUE_SOURCES = ("flagged", "audit", "uncertain", "disputed", "overlap", "mined")
QUEUE_COLUMNS = ["pair_id", "scheme", "source", "reason", "score", "tier", "all_sources", "dataset", "query",
                 "title", "current_label", "current_source", "current_confidence", "flag_probability", "skipped",
                 "blind"]


@dataclass(frozen=True)
class QueueFilters:
    """Narrow the queue. Empty `sources` and None fields mean no restriction."""

    sources: tuple[str, ...] = ()
    label: str | None = None
    query_text: str | None = None
    dataset: str | None = None


def load_queue(store: Store, annotator: str | None, filters: QueueFilters = QueueFilters(),
               settings: ReviewSettings = ReviewSettings()) -> pd.DataFrame:
    """The queue for `annotator`, best first: one row per (pair_id, scheme), columns `QUEUE_COLUMNS`.

    `source` is the highest-priority reason the item is queued for (one of `QUEUE_SOURCES`),
    `all_sources` every reason, comma-separated; `skipped` marks items this annotator skipped;
    `flag_probability` is the highest policy-flag probability of the pair's newest LLM label (null on a
    blind item). The `flagged` source exists only with `settings.flag_priority` set.
    """
    params = {
        "annotator": annotator or "",
        "min_confidence": settings.min_confidence,
        "flag_priority": settings.flag_priority,
        "overlap": settings.overlap,
        "overlap_k": settings.overlap_k,
        "blind_llm": settings.blind_llm,
        "default_scheme": settings.default_scheme,
        "sources": list(filters.sources),
        "label": filters.label or None,
        "query_text": (filters.query_text or "").strip() or None,
        "dataset": filters.dataset or None,
    }
    return store.df(sql("app.review", "queue"), params)


def queue_counts(queue: pd.DataFrame) -> dict[str, int]:
    """Items per queue source, in priority order, plus 'total'."""
    counts = {source: int((queue["source"] == source).sum()) for source in QUEUE_SOURCES}
    counts["total"] = len(queue)
    return counts


def filter_choices(store: Store) -> dict[str, list[str]]:
    """The datasets and labels the queue filters offer."""
    datasets = [row[0] for row in store.fetchall("SELECT DISTINCT dataset FROM pairs ORDER BY 1")]
    labels = [row[0] for row in store.fetchall("SELECT DISTINCT label FROM current_labels ORDER BY 1")]
    return {"dataset": datasets, "label": labels}


def is_blind(store: Store, pair_id: str, scheme: str, settings: ReviewSettings) -> bool:
    """Whether the pair is a blind-overlap item: its annotators do not see each other's labels (nor the
    LLM's, with `blind_llm`) on the review page."""
    return bool(store.scalar(sql("app.review", "in_overlap"),
                             {"pair_id": pair_id, "scheme": scheme, "overlap": settings.overlap}))
