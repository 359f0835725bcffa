"""What is in a store: counts per table, label distribution, policy flags, latest runs."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from labelstore.sqlfiles import sql
from labelstore.store import Store

TABLES = ("products", "queries", "pairs", "labels", "label_flags", "engagement_events", "audit_flags",
          "review_queue", "mining_candidates", "runs", "models")


@dataclass
class StoreStatus:
    schema_version: str
    table_counts: dict[str, int]
    label_distribution: pd.DataFrame   # scheme, source, label, n (all history)
    current_distribution: pd.DataFrame  # scheme, source, label, n (current labels)
    latest_runs: pd.DataFrame
    flags: pd.DataFrame  # scheme, flag, pairs, flagged, decided_set, decided_cleared (view current_flags)


def store_status(store: Store, runs: int = 10) -> StoreStatus:
    with store.connect() as con:
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # fixed names
        distribution = con.execute(
            "SELECT scheme, source, label, count(*) AS n FROM labels GROUP BY ALL ORDER BY scheme, source, n DESC"
        ).df()
        current = con.execute(
            "SELECT scheme, source, label, count(*) AS n FROM current_labels GROUP BY ALL ORDER BY scheme, source, n DESC"
        ).df()
        latest = con.execute(
            "SELECT run_id, kind, status, started_at, finished_at, metrics FROM runs ORDER BY started_at DESC LIMIT ?",
            [runs],
        ).df()
        flags = con.execute(sql("labelstore", "status_flags")).df()
        version = con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
    return StoreStatus(version, counts, distribution, current, latest, flags)
