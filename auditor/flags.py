"""Find labels that other evidence disputes. A functional API over frames, in the style of cleanlab:
each `find_*_issues` takes a frame of per-pair evidence and returns a frame of issues, one row per
flagged pair, with columns

    pair_id   the disputed pair
    kind      'engagement' | 'combined' | 'llm_vs_human' | 'retriever'
    reason    one sentence an analyst can read
    score     how strongly the evidence disagrees (higher: stronger)
    priority  expected impact of fixing it: impressions x disagreement (engagement), else the score
    evidence  dict of the numbers behind the reason

Every rule has an evidence threshold (`AuditSettings`), so sparse data raises nothing.
"""
from __future__ import annotations

import json
import math

import duckdb
import numpy as np
import pandas as pd

from auditor.settings import AuditSettings
from labelstore.store import insert_frame

ISSUE_COLUMNS = ["pair_id", "kind", "reason", "score", "priority", "evidence"]


def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=ISSUE_COLUMNS)


def _number(value: object, digits: int = 3) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return round(float(value), digits)


def engagement_evidence_mask(pair_metrics: pd.DataFrame, settings: AuditSettings) -> np.ndarray:
    """Boolean mask, shape (n_pairs,): pairs with enough engagement to be judged at all."""
    return ((pair_metrics["impressions"].fillna(0) >= settings.min_impressions)
            & (pair_metrics["expected_clicks"].fillna(0) >= settings.min_expected_clicks)
            & pair_metrics["grade"].notna() & pair_metrics["implied_grade"].notna()).to_numpy()


def find_engagement_issues(pair_metrics: pd.DataFrame, settings: AuditSettings,
                           label_names: dict[int, str] | None = None) -> pd.DataFrame:
    """Labels the engagement log disputes.

    pair_metrics: one row per pair, as `metrics.compute_engagement` returns (columns impressions,
        expected_clicks, clicks, coec, coec_low, coec_high, grade, label, implied_grade,
        implied_confidence, expected_grade, label_posterior, log_likelihood_ratio, ...).
    Flags a pair when it has enough evidence (min_impressions, min_expected_clicks), its implied
    grade is at least min_grade_gap away from its label, the engagement posterior of its label is
    at most max_label_posterior, and the log-likelihood ratio is at least min_log_likelihood_ratio.
    score: log-likelihood ratio; priority: impressions x |expected grade - label grade|.
    """
    if pair_metrics.empty:
        return _empty()
    m = pair_metrics
    mask = (engagement_evidence_mask(m, settings)
            & ((m["implied_grade"] - m["grade"]).abs() >= settings.min_grade_gap).to_numpy()
            & (m["label_posterior"].fillna(1.0) <= settings.max_label_posterior).to_numpy()
            & (m["log_likelihood_ratio"].fillna(0.0) >= settings.min_log_likelihood_ratio).to_numpy())
    flagged = m[mask]
    names = label_names or {}
    rows = []
    for row in flagged.itertuples(index=False):
        implied_name = names.get(int(row.implied_grade), f"grade {int(row.implied_grade)}")
        gap = abs(float(row.expected_grade) - float(row.grade))
        reason = (f"labelled '{row.label}' (grade {int(row.grade)}) but COEC {row.coec:.2f} "
                  f"[{row.coec_low:.2f}, {row.coec_high:.2f}] over {int(row.impressions)} impressions "
                  f"implies '{implied_name}' (p={row.implied_confidence:.2f})")
        evidence = {
            "label": row.label, "grade": int(row.grade), "implied_grade": int(row.implied_grade),
            "implied_confidence": _number(row.implied_confidence), "label_posterior": _number(row.label_posterior, 5),
            "expected_grade": _number(row.expected_grade), "log_likelihood_ratio": _number(row.log_likelihood_ratio),
            "impressions": int(row.impressions), "clicks": int(row.clicks), "expected_clicks": _number(row.expected_clicks),
            "coec": _number(row.coec), "coec_interval": [_number(row.coec_low), _number(row.coec_high)],
            "ctr": _number(row.ctr, 4), "add_to_carts": int(row.add_to_carts), "purchases": int(row.purchases),
            "simulated": bool(row.simulated),
        }
        rows.append({"pair_id": row.pair_id, "kind": "engagement", "reason": reason,
                     "score": float(row.log_likelihood_ratio), "priority": float(row.impressions) * gap,
                     "evidence": evidence})
    return pd.DataFrame(rows, columns=ISSUE_COLUMNS) if rows else _empty()


def find_combined_issues(pair_metrics: pd.DataFrame, settings: AuditSettings,
                         label_names: dict[int, str] | None = None) -> pd.DataFrame:
    """Human labels that engagement and the LLM, weighed together, dispute.

    pair_metrics: as for `find_engagement_issues`, plus combined_label_posterior and combined_grade
        (`auditor.evidence.combined_posterior`, NaN where a pair has no LLM probabilities).
    Flags a pair with enough engagement evidence whose combined posterior of its label is at most
    max_label_posterior and whose most likely grade is at least min_grade_gap from its label. score: 1 - that posterior (the probability the label is wrong);
    priority: impressions x score.
    """
    if pair_metrics.empty or "combined_label_posterior" not in pair_metrics:
        return _empty()
    m = pair_metrics
    combined = m["combined_label_posterior"]
    mask = (engagement_evidence_mask(m, settings)
            & (combined.notna() & (combined <= settings.max_label_posterior)).to_numpy()
            & ((m["combined_grade"] - m["grade"]).abs() >= settings.min_grade_gap).to_numpy())
    names = label_names or {}
    rows = []
    for row in m[mask].itertuples(index=False):
        wrong = 1.0 - float(row.combined_label_posterior)
        likely = names.get(int(row.combined_grade), f"grade {int(row.combined_grade)}")
        rows.append({
            "pair_id": row.pair_id, "kind": "combined", "score": wrong, "priority": float(row.impressions) * wrong,
            "reason": (f"labelled '{row.label}', but engagement over {int(row.impressions)} impressions and the "
                       f"LLM together say '{likely}': P(label wrong) = {wrong:.2f}"),
            "evidence": {"label": row.label, "grade": int(row.grade), "combined_grade": int(row.combined_grade),
                         "combined_label_posterior": _number(row.combined_label_posterior, 5),
                         "engagement_label_posterior": _number(row.label_posterior, 5),
                         "impressions": int(row.impressions), "coec": _number(row.coec),
                         "simulated": bool(row.simulated)},
        })
    return pd.DataFrame(rows, columns=ISSUE_COLUMNS) if rows else _empty()


def find_llm_human_issues(llm_human: pd.DataFrame, settings: AuditSettings) -> pd.DataFrame:
    """Pairs whose newest human and newest LLM labels disagree, the LLM being sure of itself.

    llm_human: one row per pair with human_label, human_grade, llm_label, llm_grade, llm_confidence
        (from llm_human.sql). score: |grade difference| x LLM confidence.
    """
    if llm_human.empty:
        return _empty()
    confidence = llm_human["llm_confidence"].fillna(1.0)
    mask = (llm_human["human_grade"] != llm_human["llm_grade"]) & (confidence >= settings.min_llm_confidence)
    rows = []
    for row, conf in zip(llm_human[mask].itertuples(index=False), confidence[mask]):
        score = abs(int(row.human_grade) - int(row.llm_grade)) * float(conf)
        rows.append({
            "pair_id": row.pair_id, "kind": "llm_vs_human", "score": score, "priority": score,
            "reason": f"human says '{row.human_label}', the LLM says '{row.llm_label}' with confidence {conf:.2f}",
            "evidence": {"human_label": row.human_label, "llm_label": row.llm_label, "llm_confidence": _number(conf)},
        })
    return pd.DataFrame(rows, columns=ISSUE_COLUMNS) if rows else _empty()


def find_retriever_issues(scores: pd.DataFrame, settings: AuditSettings, max_grade: int) -> pd.DataFrame:
    """Top-grade labels the retriever scores near the bottom, and bottom-grade labels it scores near the top.

    scores: one row per pair with model_id, score, score_percentile (0..1 among scored pairs), label,
        grade (from retriever_scores.sql). Fewer than retriever_min_pairs scored pairs raise nothing.
    score: how extreme the percentile is (1 - percentile for top-grade labels, percentile for bottom-grade).
    """
    if len(scores) < settings.retriever_min_pairs:
        return _empty()
    low = (scores["grade"] == max_grade) & (scores["score_percentile"] <= settings.retriever_low)
    high = (scores["grade"] == 0) & (scores["score_percentile"] >= settings.retriever_high)
    rows = []
    for row in scores[low | high].itertuples(index=False):
        score = float(row.score_percentile) if row.grade == 0 else 1.0 - float(row.score_percentile)
        where = "bottom" if row.grade == max_grade else "top"
        rows.append({
            "pair_id": row.pair_id, "kind": "retriever", "score": score, "priority": score,
            "reason": (f"labelled '{row.label}' but retriever {row.model_id} ranks it in the {where} "
                       f"{min(row.score_percentile, 1 - row.score_percentile):.0%} of scored pairs"),
            "evidence": {"model_id": row.model_id, "retriever_score": _number(row.score, 5),
                         "score_percentile": _number(row.score_percentile), "label": row.label},
        })
    return pd.DataFrame(rows, columns=ISSUE_COLUMNS) if rows else _empty()


def write_flags(con: duckdb.DuckDBPyConnection, run_id: str, issues: pd.DataFrame) -> int:
    """Insert `issues` into audit_flags for `run_id`; returns the number written."""
    if issues.empty:
        return 0
    frame = issues.assign(run_id=run_id, evidence=[json.dumps(e, sort_keys=True) for e in issues["evidence"]])
    insert_frame(con, "audit_flags", frame, ["run_id", "pair_id", "kind", "reason", "score", "evidence"])
    return len(frame)
