"""The report renders (self-contained HTML + JSON, saying 'simulated'), the CLI commands run end to
end, and the retrain trigger fires exactly when its policy says."""
from __future__ import annotations

import json

import pytest

from app.trigger import gather_counts, run_trigger
from auditor.trigger import TriggerCounts, TriggerPolicy, decide_retrain
from labelstore.catalog import generate_catalog, write_catalog
from labelstore.errors import MnrError
from labelstore.store import LabelRecord, Store


def _mnr(args: list[str]):
    """Run the real `mnr` typer app in-process (one import of every area's commands per session)."""
    from typer.testing import CliRunner

    from app.cli import app

    return CliRunner().invoke(app, args)


def test_cli_simulate_audit_report_and_trigger(tmp_path, monkeypatch):
    store_path = tmp_path / "s.duckdb"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNR_STORE", str(store_path))
    monkeypatch.setenv("MNR_CONFIG", str(tmp_path / "mnr.toml"))
    write_catalog(Store(store_path), generate_catalog(seed=0))
    (tmp_path / "mnr.toml").write_text(
        "[auditor]\nmin_impressions = 20\n\n[trigger]\nmin_new_clean_labels = 0\nmax_flagged_share = 1.0\n"
        "fire_on_drift = true\ncommand = \"echo retrain > retrained.txt\"\n", encoding="utf-8")
    simulated = _mnr(["simulate-engagement", "--sessions", "15000", "--start", "2026-01-05", "--days", "28",
                      "--drift-at", "2026-01-19"])
    assert simulated.exit_code == 0, simulated.output
    assert "SIMULATED" in simulated.output
    audited = _mnr(["audit", "--report", "report", "--trigger"])
    assert audited.exit_code == 0, audited.output
    assert "FIRES" in audited.output and "drift alarm" in audited.output
    assert (tmp_path / "retrained.txt").read_text().strip() == "retrain"
    html = (tmp_path / "report" / "audit.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 4 and "<script" not in html
    assert "Simulated engagement" in html and "CTR by position" in html
    summary = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert summary["simulated"] is True and summary["drift_alarm_total"] >= 1
    assert summary["position_curve"][0]["position"] == 1
    trigger_runs = Store(store_path).df("SELECT status, metrics FROM runs WHERE kind = 'trigger'")
    metrics = json.loads(trigger_runs["metrics"].iloc[0])
    assert trigger_runs["status"].iloc[0] == "ok" and metrics["fired"] and metrics["returncode"] == 0


def test_cli_bad_input_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MNR_STORE", str(tmp_path / "s.duckdb"))
    monkeypatch.setenv("MNR_CONFIG", str(tmp_path / "mnr.toml"))
    (tmp_path / "mnr.toml").write_text("[auditor]\nnot_a_setting = 1\n", encoding="utf-8")
    result = _mnr(["audit"])
    assert isinstance(result.exception, MnrError) and "not_a_setting" in str(result.exception)
    (tmp_path / "mnr.toml").write_text("", encoding="utf-8")
    result = _mnr(["ingest-events", str(tmp_path / "missing.csv"), "--dataset", "x"])
    assert isinstance(result.exception, MnrError) and "missing.csv" in str(result.exception)
    result = _mnr(["simulate-engagement", "--drift-at", "soon"])
    assert isinstance(result.exception, MnrError) and "--drift-at" in str(result.exception)
    result = _mnr(["simulate-engagement", "--query-patience-spread", "-1"])
    assert isinstance(result.exception, MnrError) and "query_patience_spread" in str(result.exception)


POLICY = TriggerPolicy(min_new_clean_labels=100, max_flagged_share=0.05, fire_on_drift=True, command="true")


@pytest.mark.parametrize("counts, fires, reason", [
    (TriggerCounts(99, 5, 100, 0), False, None),
    (TriggerCounts(100, 5, 100, 0), True, "100 new clean labels"),
    (TriggerCounts(0, 6, 100, 0), True, "flagged share 6.0%"),
    (TriggerCounts(0, 0, 0, 0), False, None),
    (TriggerCounts(0, 0, 100, 1), True, "1 drift alarm"),
])
def test_decision_follows_the_policy(counts, fires, reason):
    decision = decide_retrain(counts, POLICY)
    assert decision.fire is fires
    if fires:
        assert any(reason in r and r.startswith("fires") for r in decision.reasons)
    else:
        assert all(r.startswith("holds") for r in decision.reasons) and len(decision.reasons) == 3


def test_disabled_rules_never_fire():
    policy = TriggerPolicy(min_new_clean_labels=0, max_flagged_share=1.0, fire_on_drift=False)
    assert decide_retrain(TriggerCounts(10**6, 99, 100, 9), policy) == decide_retrain(TriggerCounts(0, 0, 0, 0), policy)
    assert not decide_retrain(TriggerCounts(10**6, 99, 100, 9), policy).fire


def test_trigger_counts_new_clean_labels_since_last_training_and_runs_command(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    write_catalog(store, generate_catalog(n_families=2, seed=0))
    pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id")]
    store.add_labels([LabelRecord(p, "esci", "exact", 3, "human", "ann") for p in pairs[:5]])
    assert gather_counts(store, "esci").new_clean_labels == 5
    marker = tmp_path / "fired.txt"
    policy = TriggerPolicy(min_new_clean_labels=5, max_flagged_share=1.0, fire_on_drift=False,
                           command=f"echo $MNR_TRIGGER_RUN > {marker}")
    outcome = run_trigger(store, "esci", policy)
    assert outcome.decision.fire and outcome.returncode == 0
    assert marker.read_text().strip() == outcome.run_id
    # that training resets the count: the same policy now holds, and runs nothing
    marker.unlink()
    outcome = run_trigger(store, "esci", policy)
    assert not outcome.decision.fire and not marker.exists()
    assert "0 new clean labels" in outcome.decision.reasons[0]
    # a failing command is recorded as a failed run
    store.add_labels([LabelRecord(p, "esci", "substitute", 2, "human", "ann") for p in pairs[5:10]])
    with pytest.raises(MnrError, match="exit status 3"):
        run_trigger(store, "esci", TriggerPolicy(min_new_clean_labels=5, max_flagged_share=1.0,
                                                  fire_on_drift=False, command="exit 3"))
    assert store.scalar("SELECT status FROM runs WHERE kind = 'trigger' ORDER BY started_at DESC LIMIT 1") == "failed"
