"""The re-annotation queue: flagged pairs, highest expected impact (impressions x disagreement) first."""
from __future__ import annotations

import duckdb
import pandas as pd

from labelstore.store import Store, insert_frame

QUEUE_SQL = "SELECT * FROM open_review_queue ORDER BY priority DESC, pair_id LIMIT ?"


def queue_issues(con: duckdb.DuckDBPyConnection, run_id: str, issues: pd.DataFrame, limit: int) -> int:
    """Queue the `limit` highest-priority flagged pairs (one entry per pair: its strongest issue)."""
    if issues.empty:
        return 0
    best = (issues.sort_values(["priority", "pair_id"], ascending=[False, True])
            .drop_duplicates("pair_id").head(limit))
    frame = pd.DataFrame({"pair_id": best["pair_id"], "run_id": run_id,
                          "reason": best["kind"] + ": " + best["reason"], "priority": best["priority"].astype(float)})
    insert_frame(con, "review_queue", frame, ["pair_id", "run_id", "reason", "priority"])
    return len(frame)


def open_queue(store: Store, limit: int = 1000) -> pd.DataFrame:
    """The open re-annotation queue (pair_id, run_id, reason, priority, created_at), highest priority first.

    The review UI and `mnr label --select flagged` read this.
    """
    return store.df(QUEUE_SQL, [limit])
