"""Drift: planted after a date is detected in the windows after it and not before; label
distribution and LLM-human agreement alarms follow their thresholds."""
from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from auditor import drift
from auditor.audit import run_audit
from auditor.settings import AuditSettings
from auditor.simulate import SimulationParams, simulate_into_store, truth_from_store
from labelstore.catalog import generate_catalog, write_catalog
from labelstore.store import LabelRecord, Store

START = datetime(2026, 1, 5)  # a Monday: weekly windows start on Mondays
DRIFT_AT = START + timedelta(days=21)


@pytest.fixture(scope="module")
def drifted_store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("drift") / "s.duckdb")
    write_catalog(store, generate_catalog(seed=2))
    params = SimulationParams(n_sessions=30_000, seed=2, start=START, days=42, drift_at=DRIFT_AT, drift_strength=0.8)
    simulate_into_store(store, truth_from_store(store, "esci"), params, max_grade=3)
    return store


@pytest.fixture(scope="module")
def drifted(drifted_store):
    return run_audit(drifted_store, "esci")


def _assert_drift_after_the_planted_date_only(result) -> None:
    trend = result.engagement_drift
    before = trend[pd.to_datetime(trend["window_start"]) + timedelta(days=7) <= DRIFT_AT]
    after = trend[pd.to_datetime(trend["window_start"]) >= DRIFT_AT]
    assert len(before) == 3 and len(after) == 3
    assert not before["alarm"].any()
    assert after["alarm"].all()
    assert result.summary["drift_alarms"]["engagement_consistency"] == 3


def test_engagement_drift_is_detected_after_the_planted_date_and_not_before(drifted):
    assert drifted.engagement.sample_modulus == 1
    _assert_drift_after_the_planted_date_only(drifted)


def test_a_sampled_audit_keeps_every_pair_and_still_finds_the_drift(drifted_store, drifted):
    """Above `sample_events` the curve and the drift windows read a hash sample of whole pairs;
    the per-pair metrics still read every event."""
    sampled = run_audit(drifted_store, "esci", AuditSettings(sample_events=drifted.summary["events"] // 4))
    assert sampled.engagement.sample_modulus >= 4
    assert sampled.engagement.windows["impressions"].sum() < 0.5 * drifted.engagement.windows["impressions"].sum()
    _assert_drift_after_the_planted_date_only(sampled)
    full, part = drifted.engagement.pair_metrics, sampled.engagement.pair_metrics
    assert list(part["pair_id"]) == list(full["pair_id"])
    for column in ("impressions", "clicks", "add_to_carts", "purchases"):
        assert (part[column] == full[column]).all()
    # expected clicks differ only by the curve fitted on a quarter of the pairs
    ratio = part["expected_clicks"].sum() / full["expected_clicks"].sum()
    assert abs(ratio - 1) < 0.05
    first_page = sampled.engagement.position_curve.set_index("position").loc[1:10, "examination"].to_numpy()
    full_page = drifted.engagement.position_curve.set_index("position").loc[1:10, "examination"].to_numpy()
    assert np.max(np.abs(first_page - full_page) / full_page) < 0.15


def test_no_drift_planted_no_alarm(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    write_catalog(store, generate_catalog(seed=2))
    params = SimulationParams(n_sessions=20_000, seed=5, start=START, days=42)
    simulate_into_store(store, truth_from_store(store, "esci"), params, max_grade=3)
    assert not run_audit(store, "esci").engagement_drift["alarm"].any()


def test_population_stability_index():
    assert drift.population_stability_index(np.array([50, 50]), np.array([50, 50])) == pytest.approx(0, abs=1e-9)
    expected = (0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5)
    assert drift.population_stability_index(np.array([50, 50]), np.array([80, 20])) == pytest.approx(expected, rel=1e-3)


def _label_windows(shares_by_week: list[tuple[float, float]], n: int = 200) -> pd.DataFrame:
    rows = []
    for week, (exact, irrelevant) in enumerate(shares_by_week):
        start = START + timedelta(days=7 * week)
        rows += [{"window_start": start, "segment": "llm", "label": "exact", "n": int(exact * n)},
                 {"window_start": start, "segment": "llm", "label": "irrelevant", "n": int(irrelevant * n)}]
    return pd.DataFrame(rows)


def test_label_distribution_alarm_after_the_shift_only():
    frame = _label_windows([(0.5, 0.5), (0.52, 0.48), (0.8, 0.2)])
    result = drift.label_distribution_drift(frame, AuditSettings())
    assert result["alarm"].tolist() == [False, False, True]


def test_llm_human_agreement_drop_alarm():
    rows = []
    for week, agree in enumerate([0.9, 0.88, 0.6]):
        for i in range(100):
            rows.append({"window_start": START + timedelta(days=7 * week), "human_grade": 3,
                         "llm_grade": 3 if i < agree * 100 else 0})
    result = drift.agreement_drift(pd.DataFrame(rows), AuditSettings(agreement_drop=0.15))
    assert result["alarm"].tolist() == [False, False, True]


def test_label_drift_from_the_store(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    write_catalog(store, generate_catalog(n_families=4, seed=0))
    pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id")]
    records = []
    for i, pair in enumerate(pairs):
        week = i % 2
        exact = (i // 2) % 2 == 0 if week == 0 else (i // 2) % 10 != 0
        records.append(LabelRecord(pair, "esci", "exact" if exact else "irrelevant", 3 if exact else 0, "llm", "m",
                                   created_at=START + timedelta(days=7 * week + 1)))
    store.add_labels(records)
    result = run_audit(store, "esci")
    llm = result.label_drift[result.label_drift["segment"] == "llm"]
    assert llm["alarm"].tolist() == [False, True]
