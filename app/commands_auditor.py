"""`mnr simulate-engagement`, `mnr ingest-events`, `mnr audit`: the auditor's commands."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from app.context import console, open_store
from labelstore.errors import MnrError

# The auditor's modules (scipy, matplotlib) load inside each command, keeping `mnr --help` fast.
EVENT_FORMATS = ("csv", "parquet", "jsonl", "ubi")


def _datetime(value: Optional[str], option: str) -> Optional[datetime]:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise MnrError(f"{option}: '{value}' is not an ISO date (e.g. 2026-01-15 or 2026-01-15T12:00)") from exc


def simulate_engagement(
    scheme: str = typer.Option("esci", "--scheme", help="Current labels of this scheme are the true grades."),
    sessions: int = typer.Option(20_000, "--sessions", help="Search sessions in the whole window."),
    seed: int = typer.Option(0, "--seed"),
    start: str = typer.Option("2026-01-01", "--start", help="First day of the window (ISO date)."),
    days: int = typer.Option(28, "--days", help="Length of the window in days."),
    zipf: float = typer.Option(1.0, "--zipf", help="Query popularity exponent (long tail)."),
    page_size: int = typer.Option(10, "--page-size", help="Products shown per session."),
    decay: float = typer.Option(1.0, "--examination-decay", help="Examination = position^-decay."),
    pair_noise: float = typer.Option(0.25, "--pair-noise", help="Per-pair attractiveness noise (logit sd)."),
    drift_at: Optional[str] = typer.Option(None, "--drift-at", help="Plant drift from this date on (ISO)."),
    drift_strength: float = typer.Option(0.8, "--drift-strength", help="0: none; 1: the grade->click relation inverts."),
    click_model: str = typer.Option("pbm", "--click-model", help="pbm (position-based), cascade, dbn (dynamic "
                                    "Bayesian network), ubm (user browsing model) or trust (position-based with trust bias)."),
    trust_noise: float = typer.Option(0.15, "--trust-noise", help="With --click-model trust: how often an examined "
                                      "product that does not appeal is clicked at the top (times the examination)."),
    query_patience: float = typer.Option(0.0, "--query-patience-spread", help="Spread (log sd) of a per-query "
                                         "patience: some queries' shoppers look deeper than others. 0: one for all."),
    query_appeal: float = typer.Option(0.0, "--query-appeal-spread", help="Spread (logit sd) of a per-query click "
                                       "propensity shared by the query's products. 0: none."),
    ranker: str = typer.Option("noisy", "--ranker", help="noisy (each session reshuffles around the true grade) or "
                               "fixed (a production ranker: one score per pair, a little jitter per session)."),
    explore_rate: float = typer.Option(0.02, "--explore-rate", help="Share of sessions showing a random order."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write Parquet here (file.parquet or a folder) instead of the store."),
) -> None:
    """Simulate an engagement log from the current labels (every event is marked simulated)."""
    from auditor.simulate import SimulationParams, simulate_into_store, simulate_to_parquet, truth_from_store
    from labelstore.schemes import load_scheme

    store = open_store()
    params = SimulationParams(n_sessions=sessions, seed=seed, start=_datetime(start, "--start"), days=days,
                              zipf_exponent=zipf, page_size=page_size, examination_decay=decay, pair_noise=pair_noise,
                              drift_at=_datetime(drift_at, "--drift-at"), drift_strength=drift_strength,
                              click_model=click_model, ranker=ranker, explore_rate=explore_rate, trust_noise=trust_noise,
                              query_patience_spread=query_patience, query_appeal_spread=query_appeal)
    params.validate()
    truth = truth_from_store(store, scheme)
    max_grade = load_scheme(scheme).max_grade
    with store.run("simulate", {"scheme": scheme, "sessions": sessions, "seed": seed, "out": str(out or "store")}) as run:
        with console.status("simulating engagement"):
            if out is not None:
                n = simulate_to_parquet(truth, params, max_grade, out)
            else:
                n = simulate_into_store(store, truth, params, max_grade)
        run.metrics["events"] = n
    where = out if out is not None else "the store"
    console.print(f"simulated {n:,} events (SIMULATED) over {len(truth):,} pairs into {where}"
                  + ("" if n or out else " (this simulation was already in the store)"))


def ingest_events_command(
    path: Path = typer.Argument(..., help="Events file or Parquet folder (for --format ubi: the UBI events JSON)."),
    fmt: Optional[str] = typer.Option(None, "--format", help=f"One of {', '.join(EVENT_FORMATS)} (default: from the suffix)."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset of the labelled pairs these events are about."),
    mapping: List[str] = typer.Option([], "--map", help="column=field, e.g. --map sku=product_id (repeatable)."),
    ubi_queries: Optional[Path] = typer.Option(None, "--ubi-queries", help="UBI queries JSON (with --format ubi)."),
    position_base: int = typer.Option(1, "--position-base", help="The log's first position: 1, or 0 for a log that "
                                      "counts from 0 (stored from 1)."),
) -> None:
    """Add engagement events: CSV, Parquet, JSONL (session_id, query, product_id, position, event_type, ts) or UBI."""
    from auditor.ingest import EVENT_FIELDS, OPTIONAL_FIELDS, ingest_events
    from labelstore.ingest import parse_mapping

    result = ingest_events(open_store(), path, fmt=fmt, dataset=dataset,
                           mapping=parse_mapping(mapping, EVENT_FIELDS + OPTIONAL_FIELDS),
                           ubi_queries=ubi_queries, position_base=position_base)
    if result.inserted == 0:
        console.print(f"{path}: already ingested (batch {result.batch_id}); nothing added")
    else:
        repeated = result.rows_read - result.inserted
        console.print(f"{path}: added {result.inserted:,} events (batch {result.batch_id})"
                      + (f"; {repeated:,} repeats of a session's event for the same product kept once" if repeated else ""))


def audit(
    scheme: str = typer.Option("esci", "--scheme", help="Audit the current labels of this scheme."),
    events: Optional[Path] = typer.Option(None, "--events", help="Parquet file or folder, queried in place (default: the store's events)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write audit.html and audit.json into this folder."),
    trigger: bool = typer.Option(False, "--trigger", help="Then decide on retraining (the \\[trigger] policy in mnr.toml) and launch it if it fires."),
) -> None:
    """Audit labels against engagement, LLM-vs-human and retriever evidence; flag, queue, and report."""
    from app.trigger import run_trigger
    from auditor.audit import run_audit
    from auditor.report import write_report
    from auditor.settings import AuditSettings
    from labelstore.config import section

    store = open_store()
    settings = AuditSettings.from_config(section("auditor"))
    with console.status("auditing"):
        result = run_audit(store, scheme, settings, events)
    s = result.summary
    table = Table("measure", "value", title=f"Audit {s['run_id']}" + (" (SIMULATED engagement)" if s["simulated"] else ""))
    for key in ("events", "pairs_with_events", "audited_pairs", "flagged_pairs", "queued", "drift_alarm_total"):
        table.add_row(key, f"{s[key]:,}")
    for kind, n in s["flags_by_kind"].items():
        table.add_row(f"flags: {kind}", f"{n:,}")
    table.add_row("expected wrong labels (audited)", f"{s['expected_wrong_labels']:,.0f}")
    table.add_row("impressions on pairs that move", f"{s['position_moved_share']:.0%}")
    console.print(table)
    for warning in s["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if report is not None:
        console.print(f"report: {write_report(store, result, report, settings)}")
    if trigger:
        outcome = run_trigger(store, scheme)
        verdict = "[bold green]FIRES[/]" if outcome.decision.fire else "[bold]holds[/]"
        console.print(f"retrain trigger {verdict} (run {outcome.run_id})")
        for reason in outcome.decision.reasons:
            console.print(f"  - {reason}")
        if outcome.returncode is not None:
            console.print(f"  retrain command exited {outcome.returncode}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""
    app.command("simulate-engagement")(simulate_engagement)
    app.command("ingest-events")(ingest_events_command)
    app.command("audit")(audit)
