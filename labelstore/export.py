"""Export current labels, or the whole label history, with provenance columns."""
from __future__ import annotations

from pathlib import Path

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
    query = sql("labelstore", "export_history" if history else "export_current")
    frame = store.df(query, {"scheme": scheme, "source": source})
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    if fmt == "parquet":
        frame.to_parquet(partial, index=False)
    elif fmt == "csv":
        frame.to_csv(partial, index=False)
    else:
        frame.to_json(partial, orient="records", lines=True, date_format="iso")
    partial.replace(out)
    return len(frame)
