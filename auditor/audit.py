"""One audit: engagement metrics, flags, drift, the re-annotation queue, recorded as a run of kind 'audit'."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from auditor import drift
from auditor.flags import (
    ISSUE_COLUMNS, engagement_evidence_mask, find_engagement_issues, find_llm_human_issues, find_retriever_issues,
    write_flags,
)
from auditor.metrics import EngagementTables, attach_events, compute_engagement
from auditor.queue import queue_issues
from auditor.settings import AuditSettings
from labelstore.schemes import load_scheme
from labelstore.sqlfiles import sql
from labelstore.store import Store


@dataclass
class AuditResult:
    """Everything one audit found; `summary` is what the JSON report and the run's metrics hold."""

    run_id: str
    scheme: str
    engagement: EngagementTables
    issues: pd.DataFrame
    label_drift: pd.DataFrame
    agreement_drift: pd.DataFrame
    engagement_drift: pd.DataFrame
    summary: dict[str, Any]


def run_audit(store: Store, scheme: str = "esci", settings: AuditSettings | None = None,
              events_path: str | Path | None = None) -> AuditResult:
    """Audit the current labels of `scheme` against the engagement log and other evidence.

    events_path: a Parquet file or folder queried in place; None reads the store's engagement_events.
    Writes audit_flags and review_queue rows for this run; returns the frames for the report.
    """
    settings = settings or AuditSettings()
    label_scheme = load_scheme(scheme)
    params = {"scheme": scheme, "events": str(events_path) if events_path else "store", "settings": asdict(settings)}
    with store.run("audit", params) as run:
        window = {"window_days": settings.window_days, "origin": settings.window_origin, "scheme": scheme}
        with store.connect() as con:
            attach_events(con, events_path)
            engagement = compute_engagement(con, scheme, settings)
            llm_human = con.execute(sql("auditor", "llm_human"), window).df()
            label_windows = con.execute(sql("auditor", "label_windows"), window).df()
            retriever = con.execute(sql("auditor", "retriever_scores")).df()
        names = {label.grade: label.name for label in label_scheme.labels}
        found = [find_engagement_issues(engagement.pair_metrics, settings, names),
                 find_llm_human_issues(llm_human, settings),
                 find_retriever_issues(retriever, settings, label_scheme.max_grade)]
        found = [frame for frame in found if not frame.empty]
        issues = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=ISSUE_COLUMNS)
        issues = issues.sort_values(["priority", "pair_id"], ascending=[False, True], ignore_index=True)
        label_drift = drift.label_distribution_drift(label_windows, settings)
        agreement = drift.agreement_drift(llm_human, settings)
        engagement_trend = drift.engagement_drift(engagement.windows, settings)
        with store.transaction() as con:
            n_flags = write_flags(con, run.run_id, issues)
            n_queued = queue_issues(con, run.run_id, issues, settings.queue_limit)
        summary = _summary(run.run_id, scheme, engagement, issues, label_drift, agreement, engagement_trend,
                           n_flags, n_queued, settings)
        run.metrics.update({k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k == "flags_by_kind"})
        run.metrics["drift_alarms"] = summary["drift_alarms"]
    return AuditResult(run.run_id, scheme, engagement, issues, label_drift, agreement, engagement_trend, summary)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if pd.isna(v) else (v.isoformat() if hasattr(v, "isoformat") else v)) for k, v in row.items()}
            for row in frame.to_dict("records")]


def _summary(run_id: str, scheme: str, engagement: EngagementTables, issues: pd.DataFrame,
             label_drift: pd.DataFrame, agreement: pd.DataFrame, engagement_trend: pd.DataFrame,
             n_flags: int, n_queued: int, settings: AuditSettings) -> dict[str, Any]:
    metrics = engagement.pair_metrics
    audited = int(engagement_evidence_mask(metrics, settings).sum()) if not metrics.empty else 0
    engagement_flags = int((issues["kind"] == "engagement").sum()) if not issues.empty else 0
    alarms = {
        "label_distribution": int(label_drift["alarm"].sum()) if not label_drift.empty else 0,
        "llm_human_agreement": int(agreement["alarm"].sum()) if not agreement.empty else 0,
        "engagement_consistency": int(engagement_trend["alarm"].sum()) if not engagement_trend.empty else 0,
    }
    return {
        "run_id": run_id,
        "scheme": scheme,
        "simulated": engagement.simulated,
        "events": engagement.n_events,
        "sample_one_pair_in": engagement.sample_modulus,
        "pairs_with_events": int(len(metrics)),
        "pairs_labelled_with_events": int(metrics["grade"].notna().sum()) if not metrics.empty else 0,
        "audited_pairs": audited,
        "flags": n_flags,
        "flagged_pairs": int(issues["pair_id"].nunique()) if not issues.empty else 0,
        "engagement_flagged_share": engagement_flags / audited if audited else 0.0,
        "flags_by_kind": issues["kind"].value_counts().to_dict() if not issues.empty else {},
        "queued": n_queued,
        "drift_alarms": alarms,
        "drift_alarm_total": sum(alarms.values()),
        "position_curve": _records(engagement.position_curve),
        "grade_profile": _records(engagement.grade_profile),
        "label_drift": _records(label_drift),
        "llm_human_agreement": _records(agreement),
        "engagement_drift": _records(engagement_trend),
    }
