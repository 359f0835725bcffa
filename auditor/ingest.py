"""Engagement events into the store: CSV, Parquet (a file or a folder, read by DuckDB in place),
JSONL, and OpenSearch User Behavior Insights (UBI) query + event JSON.

A source is validated whole (missing field, bad position, unknown event type, unreadable
timestamp: an `IngestError` naming file, row and field) and written in one transaction. Each
source is one batch keyed by its content (files) or its names and sizes (folders): ingesting it
again adds nothing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import duckdb

from auditor.macros import install_macros
from labelstore.errors import IngestError, MnrError
from labelstore.ids import file_hash
from labelstore.sqlfiles import sql
from labelstore.store import Store

EVENT_FIELDS = ("session_id", "query", "product_id", "position", "event_type", "ts")
OPTIONAL_FIELDS = ("simulated",)
EVENT_FORMATS = ("csv", "parquet", "jsonl", "ubi")


@dataclass
class EventIngestResult:
    """rows_read: the source's rows; inserted: events stored (a session's repeated events of one kind for one
    product are stored once, see insert_events.sql); 0 when the source was already ingested."""

    source: str
    batch_id: str
    rows_read: int
    inserted: int


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _batch_id(paths: list[Path]) -> str:
    if len(paths) == 1 and paths[0].is_file():
        return "file-" + file_hash(str(paths[0]))[:20]
    digest = hashlib.sha256()
    for path in sorted(paths):
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        for item in files:
            digest.update(f"{item.name}\x1f{item.stat().st_size}\x1f".encode())
            if item.stat().st_size < (64 << 20):
                digest.update(file_hash(str(item)).encode())
    return "files-" + digest.hexdigest()[:20]


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in EVENT_FORMATS:
            raise MnrError(f"unknown events format '{fmt}' (expected one of {', '.join(EVENT_FORMATS)})")
        return fmt
    if path.is_dir():
        return "parquet"
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("csv", "parquet", "jsonl"):
        return suffix
    if suffix in ("ndjson", "json"):
        return "jsonl"
    raise MnrError(f"{path}: cannot tell the format from the suffix; pass --format ({', '.join(EVENT_FORMATS)})")


def _read(con: duckdb.DuckDBPyConnection, path: Path, fmt: str) -> duckdb.DuckDBPyRelation:
    try:
        if fmt == "csv":
            return con.read_csv(str(path), header=True)
        if fmt == "parquet":
            return con.read_parquet(str(path / "**" / "*.parquet") if path.is_dir() else str(path))
        return con.read_json(str(path), format="auto")
    except duckdb.Error as exc:
        raise IngestError(str(path), [(None, None, f"cannot read as {fmt}: {exc}")]) from exc


def _stage_tabular(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, mapping: dict[str, str], dataset: str,
                   position_base: int) -> None:
    relation = _read(con, path, fmt)
    columns = set(relation.columns)
    problems = []
    selects = []
    for field in EVENT_FIELDS + OPTIONAL_FIELDS:
        column = mapping.get(field, field)
        if column in columns:
            selects.append(f"{_quote(column)} AS {field}")
        elif field in EVENT_FIELDS:
            problems.append((None, field, f"missing column '{column}' (have: {', '.join(sorted(columns))})"))
        else:
            selects.append(f"NULL AS {field}")
    if problems:
        raise IngestError(str(path), problems)
    relation.create_view("raw_source", replace=True)
    # column names come from the file's own header (quoted), never values
    con.execute(f"CREATE OR REPLACE TEMP VIEW raw_events AS SELECT {', '.join(selects)} FROM raw_source")
    con.execute(f"CREATE OR REPLACE TEMP TABLE staged_events AS {sql('auditor', 'stage_events')}",
                {"dataset": dataset, "position_base": position_base})


def _stage_ubi(con: duckdb.DuckDBPyConnection, queries: Path, events: Path, dataset: str) -> None:
    for name, path in (("ubi_queries", queries), ("ubi_events", events)):
        relation = _read(con, path, "jsonl")
        needed = {"ubi_queries": {"query_id", "user_query", "timestamp", "query_response_hit_ids"},
                  "ubi_events": {"action_name", "query_id", "timestamp", "event_attributes"}}[name]
        missing = sorted(needed - set(relation.columns))
        if missing:
            raise IngestError(str(path), [(None, field, "missing UBI field") for field in missing])
        relation.create_view(name, replace=True)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE staged_events AS {sql('auditor', 'stage_ubi')}", {"dataset": dataset})
    except duckdb.Error as exc:
        raise IngestError(f"{queries} + {events}", [(None, None, f"not UBI query/event JSON: {exc}")]) from exc


def ingest_events(store: Store, path: str | Path, *, fmt: str | None = None, dataset: str = "default",
                  mapping: dict[str, str] | None = None, ubi_queries: str | Path | None = None,
                  position_base: int = 1) -> EventIngestResult:
    """Validate and add one event source. For fmt 'ubi', `path` is the UBI events file and
    `ubi_queries` the UBI queries file. `dataset` must match the dataset of the labelled pairs.
    `position_base`: the first position in a tabular source (1, or 0 for a log that counts from 0); the
    store keeps positions from 1."""
    path = Path(path)
    if position_base not in (0, 1):
        raise MnrError(f"position base must be 0 or 1, got {position_base}")
    if fmt == "ubi" and position_base != 1:
        raise MnrError("--position-base applies to CSV, Parquet and JSONL events; UBI positions are read as UBI defines them")
    if not path.exists():
        raise MnrError(f"{path}: no such file or folder")
    fmt = detect_format(path, fmt)
    sources = [path] if fmt != "ubi" else [Path(ubi_queries or ""), path]
    if fmt == "ubi" and (ubi_queries is None or not Path(ubi_queries).is_file()):
        raise MnrError("UBI ingest needs --ubi-queries FILE (the ubi_queries JSON) beside the events file")
    batch_id = _batch_id(sources)
    with store.transaction() as con:
        if con.execute("SELECT count(*) FROM engagement_events WHERE batch_id = ?", [batch_id]).fetchone()[0]:
            return EventIngestResult(str(path), batch_id, 0, 0)
        install_macros(con)
        if fmt == "ubi":
            _stage_ubi(con, Path(ubi_queries), path, dataset)
        else:
            _stage_tabular(con, path, fmt, mapping or {}, dataset, position_base)
        problems = con.execute(sql("auditor", "validate_events")).fetchall()
        if problems:
            raise IngestError(str(path), [(int(row), field, message) for row, field, message in problems])
        rows = con.execute("SELECT count(*) FROM staged_events").fetchone()[0]
        con.execute(sql("auditor", "insert_events"), {"batch_id": batch_id, "collapse_repeats": fmt != "ubi"})
        inserted = con.execute("SELECT count(*) FROM engagement_events WHERE batch_id = ?", [batch_id]).fetchone()[0]
        con.execute("DROP TABLE staged_events")
    return EventIngestResult(str(path), batch_id, int(rows), int(inserted))
