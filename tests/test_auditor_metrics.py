"""Engagement metrics on hand-computed logs, and recovery of the simulator's position bias."""
from __future__ import annotations

import math
from datetime import datetime, timedelta

import duckdb
import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from auditor.metrics import attach_events, compute_engagement
from auditor.settings import AuditSettings
from auditor.simulate import SimulationParams, simulate_events, simulate_into_store, truth_from_frame, truth_from_store
from labelstore.catalog import generate_catalog, write_catalog
from labelstore import ids
from labelstore.store import LabelRecord, Store

Z = 1.96
START = datetime(2026, 1, 5)


@pytest.fixture(scope="module")
def catalog_truth() -> pd.DataFrame:
    catalog = generate_catalog(seed=0)
    return truth_from_frame(catalog.judgments, catalog.queries, "synthetic")


def _events_for(pair_id: str, position: int, impressions: int, clicks: int, carts: int = 0, buys: int = 0) -> list[dict]:
    rows = []
    for i in range(impressions):
        kinds = ["impression"]
        if i < clicks:
            kinds.append("click")
        if i < carts:
            kinds.append("add_to_cart")
        if i < buys:
            kinds.append("purchase")
        for kind in kinds:
            rows.append({"dataset": "t", "session_id": f"s{pair_id}{position}{i}", "query_id": "t:q1", "query_text": "q",
                         "product_id": pair_id, "pair_id": pair_id, "position": position, "event_type": kind,
                         "ts": START + timedelta(hours=i), "simulated": False, "batch_id": "hand"})
    return rows


def _store_with(path, rows: list[dict]) -> Store:
    store = Store(path)
    frame = pd.DataFrame(rows)
    with store.transaction() as con:
        con.register("hand", frame)
        con.execute("INSERT INTO engagement_events SELECT * FROM hand")
    store.add_labels([LabelRecord("A", "esci", "exact", 3, "import", "t"), LabelRecord("B", "esci", "irrelevant", 0, "import", "t")])
    return store


@pytest.fixture()
def hand_store(tmp_path) -> Store:
    """Pair A: 4/10 clicks at position 1, 2/10 at position 2; pair B: 2/10 and 1/10.
    Both click twice as often at 1 as at 2, so the fitted examination at 2 is exactly 0.5;
    attractiveness A = 6 / 15 = 0.4, B = 3 / 15 = 0.2, mean = 9 clicks / 30 examined = 0.3;
    reference CTR: 0.3 at 1, 0.15 at 2; expected clicks 4.5 each; COEC A = 4/3, B = 2/3."""
    rows = (_events_for("A", 1, 10, 4, carts=3, buys=1) + _events_for("A", 2, 10, 2, carts=1)
            + _events_for("B", 1, 10, 2) + _events_for("B", 2, 10, 1))
    return _store_with(tmp_path / "hand.duckdb", rows)


def _poisson_score(k: float, e: float) -> tuple[float, float]:
    half = Z * math.sqrt(k + Z * Z / 4)
    return max(k + Z * Z / 2 - half, 0) / e, (k + Z * Z / 2 + half) / e


def test_coec_and_intervals_match_hand_computation(hand_store):
    with hand_store.connect() as con:
        attach_events(con)
        tables = compute_engagement(con, "esci", AuditSettings(min_pairs_per_grade=1))
    curve = tables.position_curve.set_index("position")
    assert curve.loc[2, "examination"] == pytest.approx(0.5)
    assert curve.loc[1, "reference_ctr"] == pytest.approx(0.3)
    assert curve.loc[2, "reference_ctr"] == pytest.approx(0.15)
    pairs = tables.pair_metrics.set_index("pair_id")
    a, b = pairs.loc["A"], pairs.loc["B"]
    assert (a.impressions, a.clicks, a.add_to_carts, a.purchases) == (20, 6, 4, 1)
    assert a.expected_clicks == pytest.approx(4.5)
    assert a.coec == pytest.approx(4 / 3) and b.coec == pytest.approx(2 / 3)
    assert (a.coec_low, a.coec_high) == pytest.approx(_poisson_score(6, 4.5))
    assert (b.coec_low, b.coec_high) == pytest.approx(_poisson_score(3, 4.5))
    ci = binomtest(6, 20).proportion_ci(confidence_level=0.95, method="wilson")
    assert (a.ctr_low, a.ctr_high) == pytest.approx((ci.low, ci.high), abs=1e-3)
    ci = binomtest(4, 6).proportion_ci(confidence_level=0.95, method="wilson")
    assert a.add_to_cart_rate == pytest.approx(4 / 6)
    assert (a.add_to_cart_low, a.add_to_cart_high) == pytest.approx((ci.low, ci.high), abs=1e-3)
    ci = binomtest(1, 6).proportion_ci(confidence_level=0.95, method="wilson")
    assert (a.purchase_low, a.purchase_high) == pytest.approx((ci.low, ci.high), abs=1e-3)
    assert b.add_to_cart_rate == 0 and b.add_to_cart_low == 0
    # the implied grade follows engagement: the more clicked pair gets the higher grade
    assert a.implied_grade == 3 and b.implied_grade == 0
    assert a.label_posterior > 0.5


def test_non_harmonic_curve_matches_hand_computation(tmp_path):
    """Examination 1, 0.6, 0.4 (not 1/position); attractiveness A = 0.5, B = 0.25.
    A: 10/20 clicks at 1, 3/10 at 2, 1/5 at 3; B: 1/4 at 1, 3/20 at 2, 3/30 at 3. The pairs are shown
    at different positions, so the naive per-position CTR ratio (0.44, 0.25) is confounded; the fit is
    exact because the counts follow the model. Examined: A 20 + 6 + 2 = 28, B 4 + 12 + 12 = 28;
    mean attractiveness 21 / 56 = 0.375; reference CTR 0.375, 0.225, 0.15; expected clicks 10.5 each;
    COEC A = 14 / 10.5 = 4/3, B = 7 / 10.5 = 2/3."""
    rows = (_events_for("A", 1, 20, 10) + _events_for("A", 2, 10, 3) + _events_for("A", 3, 5, 1)
            + _events_for("B", 1, 4, 1) + _events_for("B", 2, 20, 3) + _events_for("B", 3, 30, 3))
    store = _store_with(tmp_path / "curve.duckdb", rows)
    with store.connect() as con:
        attach_events(con)
        tables = compute_engagement(con, "esci", AuditSettings(min_pairs_per_grade=1))
    curve = tables.position_curve.set_index("position")
    assert curve.index.tolist() == [1, 2, 3]
    assert curve["examination"].to_numpy() == pytest.approx([1.0, 0.6, 0.4], rel=1e-3)
    assert curve["reference_ctr"].to_numpy() == pytest.approx([0.375, 0.225, 0.15], rel=1e-3)
    assert curve["observed_ctr"].to_numpy() == pytest.approx([11 / 24, 6 / 30, 4 / 35])
    pairs = tables.pair_metrics.set_index("pair_id")
    assert pairs.loc["A", "expected_clicks"] == pytest.approx(10.5, rel=1e-3)
    assert pairs.loc["B", "expected_clicks"] == pytest.approx(10.5, rel=1e-3)
    assert pairs.loc["A", "coec"] == pytest.approx(4 / 3, rel=1e-3) and pairs.loc["B", "coec"] == pytest.approx(2 / 3, rel=1e-3)


def test_wilson_interval_edges():
    with duckdb.connect() as con:
        from auditor.macros import install_macros
        install_macros(con)
        low, high = con.execute("SELECT wilson_low(0, 10, 1.96), wilson_high(10, 10, 1.96)").fetchone()
    ci0 = binomtest(0, 10).proportion_ci(method="wilson")
    ci10 = binomtest(10, 10).proportion_ci(method="wilson")
    assert low == pytest.approx(ci0.low, abs=1e-9) and high == pytest.approx(ci10.high, abs=1e-9)


def test_position_bias_of_the_simulator_is_recovered(tmp_path):
    store = Store(tmp_path / "sim.duckdb")
    write_catalog(store, generate_catalog(seed=0))
    params = SimulationParams(n_sessions=20_000, seed=3, examination_decay=0.6)  # not 1/position
    assert simulate_into_store(store, truth_from_store(store, "esci"), params, max_grade=3) > 0
    with store.connect() as con:
        attach_events(con)
        tables = compute_engagement(con, "esci", AuditSettings())
    assert tables.simulated
    # the first page, which every session sees; later pages are sparse (page_continue)
    curve = tables.position_curve.set_index("position").loc[1:params.page_size]
    assert len(curve) == params.page_size
    truth = curve.index.to_numpy(float) ** -params.examination_decay
    estimated = curve["examination"].to_numpy()
    assert np.max(np.abs(estimated - truth) / truth) < 0.1
    harmonic = 1.0 / curve.index.to_numpy(float)
    assert np.max(np.abs(harmonic - truth) / truth) > 0.5  # a curve fixed at 1/position would be far off
    # the naive CTR ratio is confounded by the ranker putting better products on top
    naive = (curve["observed_ctr"] / curve.loc[1, "observed_ctr"]).to_numpy()
    assert np.max(np.abs(naive - truth) / truth) > np.max(np.abs(estimated - truth) / truth)


def test_simulation_is_reproducible_and_seeded(catalog_truth):
    params = SimulationParams(n_sessions=300, seed=7)
    first, again = simulate_events(catalog_truth, params, 3), simulate_events(catalog_truth, params, 3)
    other = simulate_events(catalog_truth, SimulationParams(n_sessions=300, seed=8), 3)
    pd.testing.assert_frame_equal(first, again)
    assert not first["session_id"].equals(other["session_id"])
    assert first["ts"].min() >= params.start and first["ts"].max() < params.start + timedelta(days=params.days + 1)
    # long tail: the most popular query has many times the median query's sessions
    sessions = first.groupby("query_id")["session_id"].nunique()
    assert sessions.max() >= 5 * sessions.median()


def test_sql_ids_match_labelstore_ids():
    with duckdb.connect() as con:
        from auditor.macros import install_macros
        install_macros(con)
        text = "  Cordless   DRILL 18v "
        qid, pid, pair = con.execute(
            "SELECT mnr_query_id('hd', ?), mnr_product_id('hd', '123'), mnr_pair_id(mnr_query_id('hd', ?), mnr_product_id('hd', 'hd:123'))",
            [text, text]).fetchone()
    assert qid == ids.query_id("hd", text)
    assert pid == ids.product_id("hd", "123")
    assert pair == ids.pair_id(ids.query_id("hd", text), ids.product_id("hd", "123"))
