"""One audit: engagement metrics, flags, drift, the re-annotation queue, recorded as a run of kind 'audit'."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditor import drift
from auditor.evidence import combined_posterior, labeler_matrix
from auditor.flags import (
    ISSUE_COLUMNS, engagement_evidence_mask, find_combined_issues, find_engagement_issues, find_llm_human_issues,
    find_retriever_issues, write_flags,
)
from auditor.metrics import EngagementTables, attach_events, compute_engagement
from auditor.queue import queue_issues
from auditor.settings import AuditSettings
from labelstore.schemes import LabelScheme, load_scheme
from labelstore.sqlfiles import sql
from labelstore.store import Store

# A pair "moves" when positions other than its usual one hold at least this share of its impressions.
POSITION_MOVE_SHARE = 0.05
# Below this share of impressions on moving pairs, position and product are hard to tell apart.
MIN_MOVED_SHARE = 0.2
# Flags beyond this multiple of the expected number of wrong labels (or below its inverse) are suspect.
FLAG_RATE_TOLERANCE = 1.5
# A model that believes more than this share of audited labels wrong more likely misfits the log.
IMPLAUSIBLE_ERROR_SHARE = 0.2


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
            moved_share = float(con.execute(sql("auditor", "position_variation"),
                                            {"min_share": POSITION_MOVE_SHARE}).fetchone()[0])
            llm_human = con.execute(sql("auditor", "llm_human"), window).df()
            label_windows = con.execute(sql("auditor", "label_windows"), window).df()
            retriever = con.execute(sql("auditor", "retriever_scores")).df()
            llm_probs = con.execute(sql("auditor", "llm_probs"), {"scheme": scheme}).df()
        add_combined_evidence(engagement, llm_probs, label_scheme)
        names = {label.grade: label.name for label in label_scheme.labels}
        found = [find_engagement_issues(engagement.pair_metrics, settings, names),
                 find_combined_issues(engagement.pair_metrics, settings, names),
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
        summary.update(evidence_checks(engagement.pair_metrics, summary["engagement_flags"], moved_share, settings))
        run.metrics.update({k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k == "flags_by_kind"})
        run.metrics["drift_alarms"] = summary["drift_alarms"]
    return AuditResult(run.run_id, scheme, engagement, issues, label_drift, agreement, engagement_trend, summary)


def add_combined_evidence(engagement: EngagementTables, llm_probs: pd.DataFrame, label_scheme: LabelScheme) -> None:
    """Add combined_label_posterior and combined_grade to `engagement.pair_metrics` for pairs whose
    current label a person gave (source human or import) and that also have LLM probabilities (an
    LLM's own label is not evidence about itself).

    llm_probs: one row per pair, pair_id and llm_probs ({label: p} JSON), from llm_probs.sql.
    """
    metrics = engagement.pair_metrics
    n_grades = label_scheme.max_grade + 1
    metrics["combined_label_posterior"] = np.nan
    metrics["combined_grade"] = np.nan
    if metrics.empty or llm_probs.empty:
        return
    joined = metrics[["pair_id", "grade", "label_source"]].merge(llm_probs, on="pair_id", how="left")
    usable = (joined["llm_probs"].notna() & joined["label_source"].isin(["human", "import"]) & joined["grade"].notna()
              & metrics["engagement_p0"].notna()).to_numpy()
    if not usable.any():
        return
    labeler = labeler_matrix(joined.loc[usable, "llm_probs"], {l.name: l.grade for l in label_scheme.labels}, n_grades)
    likelihood = metrics.loc[usable, [f"engagement_p{g}" for g in range(n_grades)]].to_numpy(float)
    noise = engagement.grade_profile.set_index("grade").reindex(range(n_grades))[
        [f"true_p{t}" for t in range(n_grades)]].to_numpy(float)
    labels = metrics.loc[usable, "grade"].to_numpy(int)
    known = ~np.isnan(labeler).any(axis=1)
    posterior = combined_posterior(labels[known], labeler[known], likelihood[known], noise)
    rows = np.flatnonzero(usable)[known]
    metrics.loc[metrics.index[rows], "combined_label_posterior"] = posterior[np.arange(len(rows)), labels[known]]
    metrics.loc[metrics.index[rows], "combined_grade"] = posterior.argmax(axis=1)


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
        "click_model": engagement.click_context.click_model,
        "after_click_examination": (None if np.isnan(engagement.click_context.after_click_examination)
                                    else round(engagement.click_context.after_click_examination, 4)),
        "click_context_effect": (None if np.isnan(engagement.click_context.click_context_effect)
                                 else round(engagement.click_context.click_context_effect, 4)),
        "query_patience_spread": round(engagement.query_patience_spread, 3),
        "pairs_with_events": int(len(metrics)),
        "pairs_labelled_with_events": int(metrics["grade"].notna().sum()) if not metrics.empty else 0,
        "audited_pairs": audited,
        "flags": n_flags,
        "flagged_pairs": int(issues["pair_id"].nunique()) if not issues.empty else 0,
        "engagement_flags": engagement_flags,
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


def evidence_checks(pair_metrics: pd.DataFrame, engagement_flags: int, moved_share: float,
                    settings: AuditSettings) -> dict[str, Any]:
    """What the analyst should know before trusting the flags.

    expected_wrong_labels: the audit's own estimate of wrong labels among the audited pairs, the sum
        of each pair's posterior probability that its label is wrong. A well-calibrated audit flags
        about that many (fewer when the evidence is weak), so a flag count far above it, or far
        below it with many expected, means the model does not fit this log.
    position_moved_share: the share of (sampled) impressions on pairs shown at more than one position.
    warnings: plain sentences, empty when nothing is off.
    """
    audited = engagement_evidence_mask(pair_metrics, settings) if not pair_metrics.empty else None
    expected_wrong = 0.0
    if audited is not None and audited.any():
        expected_wrong = float((1.0 - pair_metrics.loc[audited, "label_posterior"].fillna(1.0)).sum())
    warnings = []
    if engagement_flags > FLAG_RATE_TOLERANCE * expected_wrong + 1:
        warnings.append(f"{engagement_flags:,} engagement flags, but the audit expects about {expected_wrong:,.0f} "
                        "wrong labels among the audited pairs: the engagement model does not fit this log well, "
                        "so treat the flags as leads, not verdicts")
    elif expected_wrong >= 10 and engagement_flags < expected_wrong / (2 * FLAG_RATE_TOLERANCE):
        warnings.append(f"the audit expects about {expected_wrong:,.0f} wrong labels among the audited pairs but "
                        f"only {engagement_flags:,} have evidence strong enough to flag: collect more traffic "
                        "or relabel a sample")
    n_audited = int(audited.sum()) if audited is not None else 0
    if n_audited and expected_wrong > IMPLAUSIBLE_ERROR_SHARE * n_audited:
        warnings.append(f"the audit believes {expected_wrong / n_audited:.0%} of the audited labels wrong: either the "
                        "labels are very noisy or the engagement model does not fit this log (a click model other "
                        "than position-based?); relabel a random sample before acting on the flags")
    if moved_share < MIN_MOVED_SHARE:
        warnings.append(f"only {moved_share:.0%} of impressions are on pairs that appear at more than one position "
                        "(no exploration traffic, a fixed ranker?): position bias is weakly identified, so the "
                        "position curve, and the flags built on it, lean on the model's assumptions")
    return {"expected_wrong_labels": round(expected_wrong, 1), "position_moved_share": round(moved_share, 4),
            "warnings": warnings}
