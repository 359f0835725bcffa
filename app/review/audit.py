"""The newest audit report and its flags, for the audit page."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from labelstore.config import config_path, section
from labelstore.sqlfiles import sql
from labelstore.store import Store

REPORT_SUFFIXES = (".md", ".html", ".json")
REPORT_NAMES = ("audit.html", "audit.json")
DEFAULT_WORKSPACE = "mnr-workspace"


@dataclass(frozen=True)
class AuditView:
    """`run`: the audit run (None when no audit ran); `flags`: its flags (columns of audit_flags.sql)."""

    run: dict[str, Any] | None
    flags: pd.DataFrame
    report_files: list[Path] = field(default_factory=list)


def latest_audit(store: Store) -> AuditView:
    rows = store.df(sql("app.review", "latest_audit"))
    if rows.empty:
        return AuditView(None, pd.DataFrame())
    run = rows.iloc[0].to_dict()
    for key in ("params", "metrics"):
        run[key] = json.loads(run[key]) if isinstance(run[key], str) and run[key] else {}
    flags = store.df(sql("app.review", "audit_flags"), {"run_id": run["run_id"]})
    return AuditView(run, flags, report_files(run, report_folders(store, run["run_id"])))


def report_folders(store: Store, run_id: str) -> list[Path]:
    """Where `mnr run` / `mnr audit --report` put a run's report: <workspace>/reports/<run id>/,
    the workspace being `[loop] workspace` (relative to mnr.toml), and the same beside the store."""
    workspace = Path(str(section("loop").get("workspace", DEFAULT_WORKSPACE)))
    if not workspace.is_absolute():
        workspace = config_path().resolve().parent / workspace
    return [workspace / "reports" / run_id, store.path.resolve().parent / "reports" / run_id]


def report_files(run: dict[str, Any], folders: list[Path]) -> list[Path]:
    """Report files that exist: those the run names in its params or metrics, then audit.html/json in `folders`."""
    named = [Path(value) for value in [*run["params"].values(), *run["metrics"].values()]
             if isinstance(value, str) and value.endswith(REPORT_SUFFIXES)]
    candidates = named + [folder / name for folder in folders for name in REPORT_NAMES]
    return list(dict.fromkeys(path for path in candidates if path.is_file()))
