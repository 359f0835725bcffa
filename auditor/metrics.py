"""Engagement audit metrics, computed in DuckDB SQL (`auditor/sql/*.sql`) over the joined labels and events.

The events come from the store's `engagement_events` table or straight from a Parquet file or
folder (queried in place, never loaded into Python). Two aggregation passes reduce them to small
tables; every later step reads those:

1. `sample_cells.sql`: counts per (pair, position, time window) for a hash sample of whole pairs
   holding about `sample_events` events (every pair of a smaller log). The position CTR curve is
   fitted on it (position-based model, alternating steps, numpy: `auditor.model.fit_position_curve`),
   and the engagement-drift windows (`engagement_windows.sql`) are summed from it: both are
   aggregates over many pairs, which a sample of whole pairs estimates as well as the full log;
2. `event_counts.sql`: counts per pair with the clicks expected at the positions shown, from the
   fitted curve;
3. per pair (`pair_metrics.sql`): impressions, clicks, expected clicks, COEC with a Poisson score
   interval, CTR, add-to-cart and purchase rates per click with Wilson intervals, and the current label;
4. each grade's engagement profile and each pair's posterior over its true grade, by EM over the
   per-pair table (numpy: `auditor.model.fit_grade_model`; the parameters are fitted on at most
   `em_sample_pairs` pairs, then every pair gets its posterior): the engagement-implied grade and its confidence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from auditor.model import PATIENCE_EXPONENTS, GradeModel, fit_grade_model, fit_position_curve, fit_query_patience
from auditor.settings import AuditSettings
from auditor.macros import install_macros
from labelstore.errors import MnrError
from labelstore.schemes import load_scheme
from labelstore.sqlfiles import sql


@dataclass
class EngagementTables:
    """The audit's engagement results.

    position_curve: one row per position: impressions, clicks, observed_ctr (of the sampled pairs),
        examination (1 at position 1), reference_ctr (what an average pair gets there).
    pair_metrics: one row per pair seen in the log (see pair_metrics.sql and implied_grade.sql).
    grade_profile: one row per grade: label, pairs, coec, add_to_cart_rate, purchase_rate, label_trust.
    windows: one row per (time window, label): impressions, clicks, expected_clicks, coec (of the sampled pairs).
    simulated: whether any event came from the simulator.
    n_events: number of raw events read.
    sample_modulus: the curve and the windows read one pair in this many (1: every pair).
    click_context: whether examination depends on an earlier click in the session (ClickContext).
    query_patience_spread: how much queries differ in how deep their shoppers look (the sd of the log exponent
        of the examination curve across queries, `auditor.model.fit_query_patience`); 0: no difference found,
        or the fit is off (AuditSettings.max_query_patience_spread = 0).
    """

    position_curve: pd.DataFrame
    pair_metrics: pd.DataFrame
    grade_profile: pd.DataFrame
    windows: pd.DataFrame
    simulated: bool
    n_events: int
    sample_modulus: int
    click_context: "ClickContext"
    query_patience_spread: float = 0.0


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
    if "session_id" not in relation.columns:  # no sessions: no click context, every impression is evidence
        relation = relation.select("*, CAST(NULL AS VARCHAR) AS session_id")
    relation.create_view("audit_events", replace=True)


def compute_engagement(con: duckdb.DuckDBPyConnection, scheme: str, settings: AuditSettings) -> EngagementTables:
    """Run the engagement SQL on `con` (which must have `audit_events`, see `attach_events`).

    Two passes over the events (sample_cells.sql, then event_counts.sql with the fitted curve), both
    reading each event with its click context (first_clicks.sql, events_in_context.sql); the position
    curve and the grade model are fitted in numpy on the small tables they produce. Leaves the temp
    table audit_labels (the scheme's current labels) on `con` for the audit's other queries.
    """
    install_macros(con)
    raw_events = con.execute("SELECT count(*) FROM audit_events").fetchone()[0]
    sample_modulus = max(1, math.ceil(raw_events / max(settings.sample_events, 1)))
    window = {"window_days": settings.window_days, "origin": settings.window_origin}
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_first_clicks AS {sql('auditor', 'first_clicks')}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW audit_context_events AS {sql('auditor', 'events_in_context')}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_sample_cells AS {sql('auditor', 'sample_cells')}",
                {**window, "sample_modulus": sample_modulus})
    curve, context = _position_curve(con, settings)
    reference = {"reference_ctr": _reference_list(curve).tolist(), "after_click_evidence": context.after_click_evidence}
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_counts AS {sql('auditor', 'event_counts')}",
                {**reference, "curve_attractiveness": _curve_attractiveness(curve),
                 "patience_grid": [float(e) for e in PATIENCE_EXPONENTS if e != 1.0]})
    n_events, simulated = con.execute(
        "SELECT coalesce(sum(impressions + clicks + add_to_carts + purchases), 0), coalesce(bool_or(simulated), false) "
        "FROM audit_counts").fetchone()
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_labels AS {sql('auditor', 'audit_labels')}", {"scheme": scheme})
    label_scheme = load_scheme(scheme)
    patience_spread, unchanged_model = _apply_query_patience(con, label_scheme.max_grade + 1, settings)
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_pair_metrics AS {sql('auditor', 'pair_metrics')}", {"z": settings.z})
    metrics = con.execute("SELECT * FROM audit_pair_metrics ORDER BY pair_id").df()
    metrics, profile = implied_grades(metrics, label_scheme.max_grade + 1, settings, model=unchanged_model)
    profile.insert(1, "label", [label_scheme.label_for_grade(int(g)) for g in profile["grade"]])
    return EngagementTables(
        position_curve=curve,
        pair_metrics=metrics,
        grade_profile=profile,
        windows=con.execute(sql("auditor", "engagement_windows"), reference).df(),
        simulated=bool(simulated),
        n_events=int(n_events),
        sample_modulus=sample_modulus,
        click_context=context,
        query_patience_spread=patience_spread,
    )


@dataclass(frozen=True)
class ClickContext:
    """Whether examination depends on an earlier click in the session, as the log shows it.

    after_click_examination: impression-weighted mean, over positions, of the examination of an
        impression below the session's first click relative to one with no click above it; NaN when
        the log has no sessions with an impression below a click.
    click_context_effect: how far that ratio is from 1: exp of the impression-weighted root mean
        square of its log (less sampling noise), minus 1: about 0 under a position-based model (a click changes
        nothing below it), large under a cascade or DBN (shoppers stop once satisfied, or go on
        after an unsatisfying click) or a user-browsing model (examination restarts below a click).
    after_click_evidence: whether impressions below a click count as evidence (position-based logs:
        click_context_effect at most AuditSettings.max_click_context_effect). When not, only the
        impressions with no click above, and their clicks, inform the grade model: their examination
        depends on position alone under each of these models.
    """

    after_click_examination: float
    click_context_effect: float
    after_click_evidence: bool

    @property
    def click_model(self) -> str:
        return "position-based" if self.after_click_evidence else "sequential"


def _position_curve(con: duckdb.DuckDBPyConnection, settings: AuditSettings) -> tuple[pd.DataFrame, ClickContext]:
    """One row per position up to max_position: impressions, clicks, observed_ctr, examination
    (fitted), reference_ctr (what an average pair gets there with no click above it), and
    reference_ctr_after_click (below the session's first click; 0 when such impressions are not
    evidence), all from the sampled pairs of audit_sample_cells; and the log's click context."""
    columns = ["position", "impressions", "clicks", "observed_ctr", "examination", "reference_ctr",
               "examination_after_click", "reference_ctr_after_click"]
    cells = con.execute("SELECT hash(pair_id) AS pair_hash, position, after_click, sum(impressions) AS impressions, "
                        "sum(clicks) AS clicks FROM audit_sample_cells WHERE position BETWEEN 1 AND ? "
                        "GROUP BY ALL", [settings.max_position]).fetchnumpy()
    if len(cells["position"]) == 0:
        return pd.DataFrame(columns=columns), ClickContext(float("nan"), float("nan"), True)
    _, pair_index = np.unique(cells["pair_hash"], return_inverse=True)
    position = np.asarray(cells["position"], dtype=np.int64)
    after = np.asarray(cells["after_click"], dtype=bool)
    shown, clicked = np.asarray(cells["impressions"], float), np.asarray(cells["clicks"], float)
    fit = partial(fit_position_curve, iterations=settings.curve_iterations, tolerance=settings.curve_tolerance)
    positions, examination, mean_attractiveness = fit(pair_index, position, shown, clicked)
    keys, key_examination, key_attractiveness = fit(pair_index, 2 * position - 1 + after, shown, clicked)
    before = _at_keys(keys, key_examination, 2 * positions - 1)
    below = _at_keys(keys, key_examination, 2 * positions)
    def at_positions(values: np.ndarray, cells: np.ndarray | slice = slice(None)) -> np.ndarray:
        return np.bincount(position[cells], weights=values[cells], minlength=positions.max() + 1)[positions]

    both = ~np.isnan(before) & ~np.isnan(below) & (before > 0)
    context = _click_context(below[both] / before[both], at_positions(shown, after)[both],
                             at_positions(clicked, after)[both], at_positions(clicked, ~after)[both],
                             settings.max_click_context_effect)
    shown_at, clicked_at = at_positions(shown), at_positions(clicked)
    curve = pd.DataFrame({"position": positions.astype(np.int32), "impressions": shown_at.astype(np.int64),
                          "clicks": clicked_at.astype(np.int64), "observed_ctr": clicked_at / np.maximum(shown_at, 1)})
    if context.after_click_evidence:
        curve["examination"] = examination
        curve["reference_ctr"] = examination * mean_attractiveness
        curve["reference_ctr_after_click"] = curve["reference_ctr"]
    else:
        curve["examination"] = before
        curve["reference_ctr"] = np.nan_to_num(before) * key_attractiveness
        curve["reference_ctr_after_click"] = 0.0
    curve.insert(5, "examination_after_click", below / np.where(before > 0, before, np.nan))
    return curve, context


def _click_context(ratio: np.ndarray, weight: np.ndarray, clicks_below: np.ndarray, clicks_above: np.ndarray,
                   max_effect: float) -> ClickContext:
    """ClickContext from the examination below a click relative to no click above, per position.

    ratio, weight, clicks_below, clicks_above: shape (n_positions,): the ratio, the impressions below a
    click there, and the clicks below a click and with no click above. The effect is the root mean
    square of log(ratio), less each position's sampling variance (1 / clicks in each context, by the
    delta method), so that a small position-based log does not look sequential by chance.
    """
    if weight.sum() <= 0:
        return ClickContext(float("nan"), float("nan"), True)
    mean_ratio = float(np.sum(weight * ratio) / weight.sum())
    log_ratio = np.log(np.clip(ratio, 0.01, 100.0))
    noise = 1.0 / np.maximum(clicks_below, 0.5) + 1.0 / np.maximum(clicks_above, 0.5)
    spread = np.sum(weight * (log_ratio ** 2 - noise)) / weight.sum()
    effect = float(np.expm1(np.sqrt(max(spread, 0.0))))
    return ClickContext(mean_ratio, effect, effect <= max_effect)


def _at_keys(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values at `wanted` keys (keys sorted), NaN where a key is absent."""
    index = np.clip(np.searchsorted(keys, wanted), 0, max(len(keys) - 1, 0))
    return np.where((len(keys) > 0) & (keys[index] == wanted), values[index], np.nan)


def _reference_list(curve: pd.DataFrame) -> np.ndarray:
    """The reference CTR list the SQL reads (macros.sql curve_key): two entries per position from 1."""
    size = int(curve["position"].max()) if len(curve) else 0
    reference = np.zeros(2 * size)
    index = 2 * (curve["position"].to_numpy(int) - 1)
    reference[index] = curve["reference_ctr"].to_numpy(float)
    reference[index + 1] = curve["reference_ctr_after_click"].to_numpy(float)
    return np.nan_to_num(reference)


# rounds of (grade model, query patience) fits
PATIENCE_ROUNDS = 2


def _curve_attractiveness(curve: pd.DataFrame) -> float:
    """The mean attractiveness the curve's reference CTRs were scaled by (reference_ctr / examination)."""
    usable = curve[(curve["examination"].fillna(0) > 0) & (curve["reference_ctr"].fillna(0) > 0)] if len(curve) else curve
    return float(usable["reference_ctr"].iloc[0] / usable["examination"].iloc[0]) if len(usable) else 0.0


def _apply_query_patience(con: duckdb.DuckDBPyConnection, n_grades: int,
                          settings: AuditSettings) -> tuple[float, GradeModel | None]:
    """Fit each query's patience (`auditor.model.fit_query_patience`, on a grade model fitted with the curve as
    it is) and make audit_counts' expected clicks the patience-adjusted ones, with a query_patience column (the
    query's exponent, 1 where none was fitted). Returns the fitted spread and, when it is 0, the grade model fitted
    on the unchanged counts (rows: the pairs with expected clicks, by pair_id), which `implied_grades` can reuse."""
    inputs = con.execute(sql("auditor", "patience_inputs")).df()
    accepted, first_model = None, None
    if settings.max_query_patience_spread > 0 and len(inputs):
        expected_by_exponent = inputs[_exponent_columns()].to_numpy(float)
        grade = _label_grades(inputs["grade"], n_grades)
        query_index = inputs["query_index"].to_numpy(np.int64)
        expected = inputs["expected_clicks"].to_numpy(float)
        for _ in range(PATIENCE_ROUNDS):
            # the grade model read with the curve as it is takes part of the queries' differences for spread
            # within a grade; a second round refits it on the patience-adjusted expectations
            model = _fit_grades(inputs, expected, grade, n_grades, settings)
            first_model = model if first_model is None else first_model
            patience = fit_query_patience(query_index, inputs["evidence_clicks"].to_numpy(float), expected_by_exponent,
                                          grade, model, max_spread=settings.max_query_patience_spread,
                                          dispersion=settings.dispersion)
            if patience.spread == 0:
                break  # a later round that finds none keeps the earlier round's fit
            accepted, expected = patience, patience.expected_clicks
    adjusted = pd.DataFrame({"pair_id": pd.Series(dtype=str), "expected_clicks": pd.Series(dtype=float),
                             "query_patience": pd.Series(dtype=float)})
    if accepted is not None:
        adjusted = pd.DataFrame({"pair_id": inputs["pair_id"], "expected_clicks": accepted.expected_clicks,
                                 "query_patience": np.where(query_index >= 0, accepted.exponent[query_index], 1.0)})
    con.register("audit_patience", adjusted)
    con.execute(f"CREATE OR REPLACE TEMP TABLE audit_counts AS {sql('auditor', 'apply_query_patience')}")
    con.unregister("audit_patience")
    return (accepted.spread, None) if accepted is not None else (0.0, first_model)


def _exponent_columns() -> list[str]:
    """event_counts.sql's expected-click columns in the order of PATIENCE_EXPONENTS (exponent 1: expected_clicks)."""
    # event_counts.sql (and apply_query_patience.sql) name six sums besides exponent 1
    assert len(PATIENCE_EXPONENTS) == 7 and 1.0 in PATIENCE_EXPONENTS, "keep the grid and event_counts.sql in step"
    others = iter(range(1, len(PATIENCE_EXPONENTS)))
    return ["expected_clicks" if e == 1.0 else f"expected_clicks_patience_{next(others)}" for e in PATIENCE_EXPONENTS]


def _label_grades(grades: pd.Series, n_grades: int) -> np.ndarray:
    """The label grades as ints, -1 for unlabelled pairs and grades outside the scheme."""
    grade = grades.fillna(-1).to_numpy(dtype=np.int64)
    return np.where(grade < n_grades, grade, -1)


def _fit_grades(counts: pd.DataFrame, expected_clicks: np.ndarray, grade: np.ndarray, n_grades: int,
                settings: AuditSettings) -> GradeModel:
    """`fit_grade_model` on per-pair counts (evidence_clicks, add_to_carts, purchases, clicks) with the settings' knobs."""
    return fit_grade_model(counts["evidence_clicks"].to_numpy(float), expected_clicks,
                           counts["add_to_carts"].to_numpy(float), counts["purchases"].to_numpy(float), grade,
                           n_grades, label_trust=settings.label_trust, pair_variation=settings.pair_variation,
                           dispersion=settings.dispersion, iterations=settings.em_iterations,
                           min_pairs_per_grade=settings.min_pairs_per_grade, max_fit_pairs=settings.em_sample_pairs,
                           all_clicks=counts["clicks"].to_numpy(float), min_pair_variation=settings.min_pair_variation)


def implied_grades(pair_metrics: pd.DataFrame, n_grades: int, settings: AuditSettings, *,
                   model: GradeModel | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add the engagement-implied grade to `pair_metrics` (one row per pair) and return each grade's profile.

    Added columns: implied_grade (the most probable true grade given engagement and the label),
    implied_confidence (its probability), expected_grade (posterior mean), label_posterior (the
    posterior probability of the current label), log_likelihood_ratio (best grade vs the label,
    engagement alone), and engagement_p0..engagement_p{n_grades-1}: P(grade | engagement) under a
    flat prior, to combine with other evidence. NaN where a pair has no expected clicks.
    Profile: one row per grade: grade, pairs (labelled), coec, add_to_cart_rate, purchase_rate, and
    label_trust (the fitted probability that a label of this grade is right), and true_p0..: the
    fitted P(true grade | a label of this grade).
    model: a grade model already fitted on these pairs' counts (rows: the pairs with expected clicks, in order),
        used instead of fitting one.
    """
    metrics = pair_metrics.copy()
    observed = (metrics["expected_clicks"].fillna(0) > 0).to_numpy()
    grade = _label_grades(metrics["grade"], n_grades)
    m = metrics[observed]
    if model is None or len(model.posterior) != len(m):
        model = _fit_grades(m, m["expected_clicks"].to_numpy(float), grade[observed], n_grades, settings)
    rows = np.arange(int(observed.sum()))
    labelled = grade[observed] >= 0
    label_index = np.where(labelled, grade[observed], 0)
    best = model.posterior.argmax(axis=1) if rows.size else np.zeros(0, int)
    values = {
        "implied_grade": best.astype(float),
        "implied_confidence": model.posterior[rows, best] if rows.size else np.zeros(0),
        "expected_grade": model.posterior @ model.grades.astype(float),
        "label_posterior": np.where(labelled, model.posterior[rows, label_index], np.nan),
        "log_likelihood_ratio": np.where(labelled, model.log_likelihood.max(axis=1, initial=0.0)
                                         - model.log_likelihood[rows, label_index], np.nan),
    }
    values.update({f"engagement_p{g}": model.likelihood_posterior[:, g] for g in range(n_grades)})
    for column, value in values.items():
        full = np.full(len(metrics), np.nan)
        full[observed] = value
        metrics[column] = full
    profile = pd.DataFrame({"grade": model.grades, "pairs": model.pairs_per_grade, "coec": model.coec,
                            "add_to_cart_rate": model.add_to_cart_rate, "purchase_rate": model.purchase_rate,
                            "label_trust": np.diag(model.label_noise),
                            **{f"true_p{t}": model.label_noise[:, t] for t in range(n_grades)}})
    return metrics, profile
