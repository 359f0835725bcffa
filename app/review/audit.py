"""The newest audit report and its flags, for the audit page."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from app.review.queue import review_sql
from labelstore.store import Store

REPORT_SUFFIXES = (".md", ".html", ".json")


@dataclass(frozen=True)
class AuditView:
    """`run`: the audit run (None when no audit ran); `flags`: its flags (columns of audit_flags.sql)."""

    run: dict[str, Any] | None
    flags: pd.DataFrame
    report_files: list[Path] = field(default_factory=list)


def latest_audit(store: Store) -> AuditView:
    rows = store.df(review_sql("latest_audit"))
    if rows.empty:
        return AuditView(None, pd.DataFrame())
    run = rows.iloc[0].to_dict()
    for key in ("params", "metrics"):
        run[key] = json.loads(run[key]) if isinstance(run[key], str) and run[key] else {}
    flags = store.df(review_sql("audit_flags"), {"run_id": run["run_id"]})
    return AuditView(run, flags, report_files(run))


def report_files(run: dict[str, Any]) -> list[Path]:
    """Report files the run names in its params or metrics that exist on this machine."""
    found = []
    for value in [*run["params"].values(), *run["metrics"].values()]:
        if isinstance(value, str) and value.endswith(REPORT_SUFFIXES) and Path(value).is_file():
            found.append(Path(value))
    return found
