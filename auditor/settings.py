"""Audit thresholds and knobs: the `[auditor]` section of mnr.toml overrides these defaults."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from labelstore.errors import MnrError


@dataclass(frozen=True)
class AuditSettings:
    """Every threshold of the audit. Evidence thresholds keep sparse data from raising flags.

    Engagement metrics
        window_days: width of the time windows (drift series); window_origin: where windows start.
        max_position: positions beyond this are left out of the position curve.
        curve_iterations, curve_tolerance: at most this many alternating steps of the position-curve
            fit, stopping once no position's examination moves by more than the tolerance (relative).
        sample_events: the position curve and the engagement-drift windows are computed on the pairs of a
            hash sample holding about this many events (every pair of a smaller log); per-pair metrics
            always read every event.
        max_click_context_effect: when impressions below a session's first click are examined at a
            rate that differs from that of impressions with no click above by more than this (relative,
            averaged over positions: a cascade, DBN or user-browsing log), only impressions with no
            click above are click evidence.
        z: normal quantile of every interval (1.96: 95%).
        min_pairs_per_grade: grades with fewer labelled pairs borrow their profile from their neighbours.
        label_trust: the EM's starting P(true grade = label) (refitted from the log).
        pair_variation: how much a pair's attractiveness varies around its grade's (coefficient of
            variation of the Gamma factor of the negative-binomial click model); 0: estimated from the log,
            at least min_pair_variation (so one pair's evidence saturates even where clicks are few).
        dispersion: divides log-likelihoods (1 trusts the model fully). em_iterations: at most this many EM steps.
        em_sample_pairs: the EM fits the grade profiles on a seeded sample of at most this many pairs,
            then gives every pair its posterior (a few dozen parameters need no more).
        max_query_patience_spread: queries differ in how deep their shoppers look; each query's examination
            curve is the log's raised to an exponent whose spread across queries (sd of its log) is fitted
            from the log, up to this (`auditor.model.fit_query_patience`); 0 turns the fit off.
    Engagement flags (all must hold)
        min_impressions, min_expected_clicks: enough data.
        min_log_likelihood_ratio: best grade vs the label's grade, after dispersion.
        max_label_posterior: the engagement posterior of the label's grade is at most this.
        min_grade_gap: |implied grade - label grade| at least this.
    Other flags
        min_llm_confidence: an LLM label must be at least this sure to dispute a human one.
        retriever_low / retriever_high: score percentiles below which a top-grade label, or above
        which a bottom-grade label, is disputed; retriever_min_pairs: fewer scored pairs raise nothing.
    Drift alarms
        psi_alarm, chi2_alpha: label distribution vs the reference window (the first).
        agreement_drop: LLM-human agreement below the reference window's by more than this.
        coec_change: a label's COEC moving by more than this factor (log scale) vs the reference window.
        drift_min_count: windows with fewer labels / expected clicks per label are not tested.
    Queue
        queue_limit: most pairs queued per audit.
    """

    window_days: int = 7
    window_origin: str = "2000-01-03"
    max_position: int = 50
    curve_iterations: int = 50
    curve_tolerance: float = 1e-4
    sample_events: int = 5_000_000
    max_click_context_effect: float = 0.5
    z: float = 1.96
    min_pairs_per_grade: int = 5
    label_trust: float = 0.8
    pair_variation: float = 0.0
    min_pair_variation: float = 0.15
    dispersion: float = 1.0
    em_iterations: int = 30
    em_sample_pairs: int = 100_000
    max_query_patience_spread: float = 1.5
    min_impressions: int = 20
    min_expected_clicks: float = 2.0
    min_log_likelihood_ratio: float = 2.0
    max_label_posterior: float = 0.5
    min_grade_gap: int = 1
    min_llm_confidence: float = 0.7
    retriever_low: float = 0.05
    retriever_high: float = 0.95
    retriever_min_pairs: int = 50
    psi_alarm: float = 0.2
    chi2_alpha: float = 0.001
    agreement_drop: float = 0.15
    coec_change: float = 0.35
    drift_min_count: float = 30.0
    queue_limit: int = 1000

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> "AuditSettings":
        """Defaults overridden by `values` (the [auditor] table); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise MnrError(f"mnr.toml [auditor]: unknown setting(s) {unknown}; known: {sorted(known)}")
        typed: dict[str, Any] = {}
        for name, value in values.items():
            default = getattr(cls, name)
            try:
                typed[name] = type(default)(value)
            except (TypeError, ValueError) as exc:
                raise MnrError(f"mnr.toml [auditor]: {name} = {value!r} is not a {type(default).__name__}") from exc
        return replace(cls(), **typed)
