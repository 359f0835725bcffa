"""Engagement audit metrics, computed in DuckDB SQL (`auditor/sql/*.sql`) over the joined labels and events.

The events come from the store's `engagement_events` table or straight from a Parquet file or
folder (queried in place, never loaded into Python). One aggregation pass reduces them to counts
per (pair, position, time window); every later step reads those counts:

1. the position CTR curve, fitted on the log itself (position-based model, alternating steps);
2. per pair: impressions, clicks, expected clicks, COEC with a Poisson score interval, CTR,
   add-to-cart and purchase rates per click with Wilson intervals, and the current label;
3. each label's engagement profile (median COEC, conversion rates);
4. the engagement-implied grade: a posterior over grades and its confidence.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd

from auditor.settings import AuditSettings
from auditor.sqlfiles import auditor_sql, install_macros
from labelstore.errors import MnrError


@dataclass
class EngagementTables:
    """The audit's engagement results.

    position_curve: one row per position: impressions, clicks, observed_ctr, examination (1 at
        position 1), reference_ctr (what an average pair gets there).
    pair_metrics: one row per pair seen in the log (see pair_metrics.sql and implied_grade.sql).
    grade_profile: one row per label grade: pairs, coec, add_to_cart_rate, purchase_rate.
    windows: one row per (time window, label): impressions, clicks, expected_clicks, coec.
    simulated: whether any event came from the simulator.
    n_events: number of raw events read.
    """

    position_curve: pd.DataFrame
    pair_metrics: pd.DataFrame
    grade_profile: pd.DataFrame
    windows: pd.DataFrame
    simulated: bool
    n_events: int


def attach_events(con: duckdb.DuckDBPyConnection, events_path: str | Path | None = None) -> None:
    """Make the view `audit_events`: the store's engagement_events, or Parquet at `events_path`
    (a file, a glob, or a folder read as `folder/**/*.parquet`)."""
    if events_path is None:
        con.execute("CREATE OR REPLACE TEMP VIEW audit_events AS SELECT * FROM engagement_events")
        return
    path = Path(events_path)
    pattern = str(path / "**" / "*.parquet") if path.is_dir() else str(path)
    if not path.is_dir() and not any(ch in str(path) for ch in "*?[") and not path.is_file():
        raise MnrError(f"{events_path}: no such Parquet file or folder")
    try:
        relation = con.read_parquet(pattern)
    except duckdb.Error as exc:
        raise MnrError(f"{events_path}: cannot read as Parquet: {exc}") from exc
    required = {"pair_id", "position", "event_type", "ts", "simulated"}
    missing = sorted(required - set(relation.columns))
    if missing:
        raise MnrError(f"{events_path}: Parquet events lack column(s) {missing}; "
                       "ingest them with `mnr ingest-events` to fill pair ids, or add the columns")
    relation.create_view("audit_events", replace=True)


def compute_engagement(con: duckdb.DuckDBPyConnection, scheme: str, settings: AuditSettings) -> EngagementTables:
    """Run the engagement SQL on `con` (which must have `audit_events`, see `attach_events`)."""
    install_macros(con)
    window = {"window_days": settings.window_days, "origin": settings.window_origin}
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_counts AS {auditor_sql('event_counts')}", window)
    n_events, simulated = con.execute(
        "SELECT coalesce(sum(impressions + clicks + add_to_carts + purchases), 0), coalesce(bool_or(simulated), false) "
        "FROM audit_counts").fetchone()
    con.execute(auditor_sql("position_counts"), {"max_position": settings.max_position})
    con.execute(auditor_sql("examination_start"))
    for _ in range(settings.curve_iterations):
        con.execute(auditor_sql("position_curve_step"))
        if con.execute(auditor_sql("position_curve_change")).fetchone()[0] < settings.curve_tolerance:
            break
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_position_curve AS {auditor_sql('position_curve')}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_pair_metrics AS {auditor_sql('pair_metrics')}",
                {"z": settings.z, "scheme": scheme})
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_grade_profile AS {auditor_sql('grade_profile')}",
                {"min_expected_clicks": settings.profile_min_expected_clicks,
                 "min_pairs_per_grade": settings.min_pairs_per_grade})
    implied = con.execute(auditor_sql("implied_grade"), {"dispersion": settings.dispersion}).df()
    metrics = con.execute("SELECT * FROM audit_pair_metrics ORDER BY pair_id").df()
    if not implied.empty:
        metrics = metrics.merge(implied, on="pair_id", how="left")
    else:
        for column in ("implied_grade", "implied_confidence", "expected_grade", "label_posterior",
                       "log_likelihood_ratio", "posterior_grades", "grade_posterior"):
            metrics[column] = pd.NA
    return EngagementTables(
        position_curve=con.execute("SELECT * FROM audit_position_curve ORDER BY position").df(),
        pair_metrics=metrics,
        grade_profile=con.execute("SELECT * FROM audit_grade_profile ORDER BY grade").df(),
        windows=con.execute(auditor_sql("engagement_windows"), {"scheme": scheme}).df(),
        simulated=bool(simulated),
        n_events=int(n_events),
    )
