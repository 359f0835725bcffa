"""Export current labels, or the whole label history, with provenance columns.

Policy flags become columns: for every flag present among the exported labels, `flag_<name>` (the
labeler's probability) and `flag_<name>_decision` (a human's set / clear; empty when none was made).

A history export also writes the audit trail beside it (`events_path`): every review decision, skip,
undo, adjudication, account change and login attempt, accepted or refused, oldest first.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from labelstore.errors import MnrError
from labelstore.sqlfiles import sql
from labelstore.store import Store

EXPORT_FORMATS = ("parquet", "csv", "jsonl")


def export_labels(store: Store, out: str | Path, *, fmt: str | None = None, history: bool = False,
                  scheme: str | None = None, source: str | None = None) -> int:
    """Write labels joined with their query and product text to `out`; returns the row count.

    The file is written to a temporary name and renamed, so a failed export leaves no partial file.
    """
    out = Path(out)
    fmt = fmt or out.suffix.lstrip(".").lower()
    if fmt not in EXPORT_FORMATS:
        raise MnrError(f"{out}: unknown export format '{fmt}' (use one of {', '.join(EXPORT_FORMATS)})")
    kind = "history" if history else "current"
    params = {"scheme": scheme, "source": source}
    frame = store.df(sql("labelstore", f"export_{kind}"), params)
    flags = store.df(sql("labelstore", f"export_flags_{kind}"), params if history else {"scheme": scheme})
    keys = ["label_id"] if history else ["pair_id", "scheme"]
    frame = with_flag_columns(frame, flags.merge(frame[keys], on=keys), keys)  # only the exported rows' flags
    out.parent.mkdir(parents=True, exist_ok=True)
    if history:
        _write(store.df(sql("labelstore", "export_events"), {"scheme": scheme}), events_path(out), fmt)
    _write(frame, out, fmt)
    return len(frame)


def with_flag_columns(labels: pd.DataFrame, flags: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """`labels` with `flag_<name>` (probability, float) and `flag_<name>_decision` (nullable boolean)
    columns for every flag in `flags` (long form: `keys`, flag, probability, decision), flags sorted by name."""
    if flags.empty:
        return labels
    wide = flags.pivot(index=keys, columns="flag", values=["probability", "decision"])
    columns: dict[str, pd.Series] = {}
    for name in sorted(flags["flag"].unique()):
        columns[f"flag_{name}"] = wide[("probability", name)].astype("float64")
        columns[f"flag_{name}_decision"] = wide[("decision", name)].astype("boolean")
    return labels.merge(pd.DataFrame(columns).reset_index(), on=keys, how="left")


def events_path(out: str | Path) -> Path:
    """Where a history export to `out` puts the audit trail: `labels.parquet` -> `labels.events.parquet`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.events{out.suffix}")


def _write(frame: pd.DataFrame, out: Path, fmt: str) -> None:
    partial = out.with_name(out.name + ".partial")
    if fmt == "parquet":
        frame.to_parquet(partial, index=False)
    elif fmt == "csv":
        frame.to_csv(partial, index=False)
    else:
        frame.to_json(partial, orient="records", lines=True, date_format="iso")
    partial.replace(out)
