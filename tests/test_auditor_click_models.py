"""The simulator's click models and ranker modes: each behaves as its model says, and the
attractiveness it was given is recovered from its log with the recorded true examination."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from auditor.simulate import CLICK_MODELS, SimulationParams, grade_table, simulate_events, truth_from_frame
from labelstore.catalog import generate_catalog
from labelstore.errors import MnrError

MAX_GRADE = 3


@pytest.fixture(scope="module")
def truth() -> pd.DataFrame:
    catalog = generate_catalog(seed=0)
    return truth_from_frame(catalog.judgments, catalog.queries, "synthetic")


def _impressions(events: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """One row per impression with `clicked` and the true grade."""
    shown = events[events["event_type"] == "impression"]
    clicks = events.loc[events["event_type"] == "click", ["session_id", "pair_id"]].assign(clicked=True)
    frame = shown.merge(clicks, on=["session_id", "pair_id"], how="left")
    frame["clicked"] = frame["clicked"].fillna(False).astype(bool)
    return frame.merge(truth[["pair_id", "grade"]], on="pair_id")


def _simulate(truth: pd.DataFrame, **overrides) -> pd.DataFrame:
    # pair_noise 0: every pair of a grade is exactly as attractive as the grade table says; one page
    # shows every judged product, and exploration puts low grades on top often enough to measure them
    params = SimulationParams(**{"n_sessions": 12000, "seed": 5, "pair_noise": 0.0, "page_continue": 0.0,
                                 "page_size": 30, "explore_rate": 0.3, **overrides})
    return _impressions(simulate_events(truth, params, MAX_GRADE, with_truth=True), truth)


@pytest.mark.parametrize("click_model", [model for model in CLICK_MODELS if model != "trust"])
def test_known_attractiveness_is_recovered_from_each_click_model(truth, click_model):
    """clicks / sum(true examination) per grade estimates the grade's attractiveness (trust bias breaks this
    on purpose: see the next test)."""
    impressions = _simulate(truth, click_model=click_model)
    per_grade = impressions.groupby("grade").agg(clicks=("clicked", "sum"), exposure=("true_examination", "sum"))
    recovered = per_grade["clicks"] / per_grade["exposure"]
    expected = grade_table(SimulationParams(), MAX_GRADE).set_index("grade")["attractiveness"]
    # clicks are Poisson-like given the exposure: allow 4 standard errors, and never more than 15%
    standard_error = np.sqrt(expected * per_grade["exposure"]) / per_grade["exposure"]
    assert (np.abs(recovered - expected) <= 4 * standard_error).all(), recovered.to_dict()
    assert np.max(np.abs(recovered - expected) / expected) < 0.15, recovered.to_dict()


def test_trust_bias_clicks_unappealing_products_near_the_top_as_its_formula_says(truth):
    """P(click) = e * (a + trust_noise * e * (1 - a)), e = position^-decay: per grade at the top and lower down,
    within 4 standard errors; the lowest grade's click rate per examination is well above its attractiveness
    at the top, and far lower further down."""
    impressions = _simulate(truth, click_model="trust", trust_noise=0.3)
    attractiveness = grade_table(SimulationParams(), MAX_GRADE).set_index("grade")["attractiveness"]
    e = impressions["position"] ** -1.0
    np.testing.assert_allclose(impressions["true_examination"], e, rtol=1e-12)
    expected = e * (impressions["grade"].map(attractiveness) + 0.3 * e * (1 - impressions["grade"].map(attractiveness)))
    cells = impressions.assign(expected=expected, top=impressions["position"] <= 2).groupby(["grade", "top"])
    observed, predicted, n = cells["clicked"].mean(), cells["expected"].mean(), cells.size()
    assert (np.abs(observed - predicted) <= 4 * np.sqrt(predicted * (1 - predicted) / n)).all(), (observed, predicted)
    per_exposure = (cells["clicked"].sum() / cells["true_examination"].sum()).loc[0]
    assert per_exposure.loc[True] > 3 * attractiveness.loc[0] and per_exposure.loc[True] > 2.5 * per_exposure.loc[False]


def test_position_based_examination_is_the_position_power(truth):
    impressions = _simulate(truth, click_model="pbm", examination_decay=0.6)
    np.testing.assert_allclose(impressions["true_examination"], impressions["position"] ** -0.6, rtol=1e-12)


def test_cascade_stops_at_the_first_click_and_its_own_estimator_recovers_attractiveness(truth):
    impressions = _simulate(truth, click_model="cascade")
    assert impressions.groupby("session_id")["clicked"].sum().max() == 1
    # The cascade estimator needs no examination model: everything at or above the first click (or the
    # whole list when nothing was clicked) was examined.
    first_click = impressions[impressions["clicked"]].groupby("session_id")["position"].min()
    depth = impressions["session_id"].map(first_click).fillna(np.inf)
    examined = impressions[impressions["position"] <= depth]
    recovered = examined.groupby("grade")["clicked"].mean()
    expected = grade_table(SimulationParams(), MAX_GRADE).set_index("grade")["attractiveness"]
    assert np.max(np.abs(recovered - expected) / expected) < 0.1, recovered.to_dict()


def test_dbn_with_certain_satisfaction_and_no_abandonment_is_the_cascade(truth):
    cascade = _simulate(truth, click_model="cascade")
    dbn = _simulate(truth, click_model="dbn", satisfaction_min=1.0, satisfaction_max=1.0, continue_prob=1.0)
    pd.testing.assert_series_equal(cascade["clicked"], dbn["clicked"])


def test_dbn_shoppers_go_on_after_an_unsatisfying_click_and_abandon(truth):
    impressions = _simulate(truth, click_model="dbn", continue_prob=0.8)
    clicks_per_session = impressions.groupby("session_id")["clicked"].sum()
    assert clicks_per_session.max() >= 2
    # examination falls with depth even where nothing was clicked (abandonment)
    by_position = impressions.groupby("position")["true_examination"].mean()
    assert by_position.is_monotonic_decreasing and by_position.iloc[-1] < 0.5


def test_ubm_examination_restarts_below_each_click(truth):
    impressions = _simulate(truth, click_model="ubm").sort_values(["session_id", "position"])
    above_clicked = impressions.groupby("session_id")["clicked"].shift(1, fill_value=False)
    assert (impressions.loc[above_clicked, "true_examination"] == 1.0).all() and above_clicked.sum() > 100
    no_click_above = impressions.groupby("session_id")["clicked"].cumsum() - impressions["clicked"] == 0
    np.testing.assert_allclose(impressions.loc[no_click_above, "true_examination"],
                               1.0 / impressions.loc[no_click_above, "position"])


def test_fixed_ranker_keeps_each_product_near_one_position(truth):
    def position_spread(**overrides) -> float:
        impressions = _simulate(truth, explore_rate=0.0, **overrides)
        return float(impressions.groupby("pair_id")["position"].std().mean())

    fixed, noisy = position_spread(ranker="fixed"), position_spread(ranker="noisy")
    assert fixed < 0.25 * noisy, (fixed, noisy)


def test_the_store_never_sees_the_oracle_column(truth):
    events = simulate_events(truth, SimulationParams(n_sessions=50, seed=1), MAX_GRADE)
    assert "true_examination" not in events.columns


@pytest.mark.parametrize("bad", [{"click_model": "random"}, {"ranker": "oracle"}, {"continue_prob": 0.0},
                                 {"trust_noise": 1.5}])
def test_bad_simulation_settings_are_named(truth, bad):
    with pytest.raises(MnrError, match=next(iter(bad))):
        SimulationParams(**bad).validate()


def test_queries_differ_in_depth_and_in_click_level_only_when_asked(truth):
    """query_patience_spread: a query's examination is position^-(decay / p), p shared by the query; query_appeal_spread:
    a query's products share a logit shift. Both off (0), queries of the log are alike; on, they differ as stated."""
    alike = _simulate(truth)
    deep = _simulate(truth, query_patience_spread=1.0)
    position = alike["position"].to_numpy(float)
    np.testing.assert_allclose(alike["true_examination"], position ** -1.0, rtol=1e-12)
    # per query, log examination / log position^-1 is the query's 1 / p: one value per query, spread as asked
    ratio = (np.log(deep["true_examination"]) / -np.log(deep["position"]))[deep["position"] > 1]
    per_query = ratio.groupby(deep.loc[deep["position"] > 1, "query_id"]).agg(["min", "max"])
    np.testing.assert_allclose(per_query["min"], per_query["max"], rtol=1e-9)
    assert 0.6 < np.log(per_query["min"]).std() < 1.4

    clicky = _simulate(truth, query_appeal_spread=1.0)
    def click_level(impressions: pd.DataFrame) -> pd.Series:
        by_query = impressions.groupby("query_id")
        return by_query["clicked"].sum() / by_query["true_examination"].sum()
    assert np.log(click_level(clicky)).std() > 1.5 * np.log(click_level(alike)).std()
    with pytest.raises(MnrError, match="query_appeal_spread"):
        SimulationParams(query_appeal_spread=-1).validate()
