"""The store: one DuckDB file, the system of record.

Concurrency
-----------
DuckDB lets one process at a time open a file read-write. Every access here is a
*short-lived connection*: `Store.connect()` opens the file, does one unit of work, and closes it.
When another process holds the file, opening raises a lock error; we retry with jittered
exponential backoff until `lock_timeout` seconds have passed, then raise `StoreLockedError`.
Writers therefore take turns at the granularity of one transaction (a chunk of labels, one UI
decision), and every write is idempotent through `labels.dedup_key`, so a retried or resumed
write never lands twice. A long batch job and the review UI can both write; neither loses anything.
"""
from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from labelstore.errors import StoreError, StoreLockedError

SQL_DIR = Path(__file__).parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
LABEL_SOURCES = ("human", "llm", "audit", "import")


def new_run_id(kind: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{kind}-{stamp}-{uuid.uuid4().hex[:8]}"


def utcnow() -> datetime:
    """Naive UTC timestamp, the form DuckDB's TIMESTAMP columns hold."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class LabelRecord:
    """One row of label history. `probs` maps every scheme label to its probability.

    `flags` maps a policy flag's name to the labeler's probability that it applies;
    `flag_decisions` maps a flag's name to a human's decision (True: set, False: cleared).
    Both are stored in `label_flags`, in the same transaction as the label.
    """

    pair_id: str
    scheme: str
    label: str
    grade: int
    source: str
    author: str
    probs: dict[str, float] | None = None
    confidence: float | None = None
    run_id: str | None = None
    comment: str | None = None
    needs_review: bool = False
    dedup_key: str | None = None
    created_at: datetime | None = None
    flags: dict[str, float] | None = None
    flag_decisions: dict[str, bool] | None = None

    def __post_init__(self) -> None:
        if self.source not in LABEL_SOURCES:
            raise ValueError(f"label source must be one of {LABEL_SOURCES}, not '{self.source}'")
        for name, probability in (self.flags or {}).items():
            if not 0.0 <= float(probability) <= 1.0:
                raise ValueError(f"pair {self.pair_id}: flag '{name}' probability {probability} is not in [0, 1]")


def _is_lock_error(exc: Exception) -> bool:
    """Whether opening failed because another process holds the file, or is just letting it go: a writer
    that is closing (checkpointing its WAL) can leave a reader short of bytes for a moment (seen under load)."""
    text = str(exc).lower()
    held = "lock" in text and ("conflicting" in text or "could not set" in text or "resource temporarily" in text)
    return held or "could not read enough bytes" in text


def _migrations() -> list[tuple[str, Path]]:
    return [(p.stem, p) for p in sorted(MIGRATIONS_DIR.glob("*.sql"))]


class Store:
    """A mine-refine store at `path`. Opening it creates the file or brings its schema up to date."""

    def __init__(self, path: str | Path = "mnr.duckdb", *, lock_timeout: float = 120.0, migrate: bool = True):
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        if migrate:
            self.migrate()

    # -- connections ---------------------------------------------------------------------------
    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-write connection, retried while another process holds the lock."""
        con = self._open_with_retry()
        try:
            yield con
        finally:
            con.close()

    def _open_with_retry(self) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.01
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.IOException as exc:
                if not _is_lock_error(exc):
                    raise StoreError(f"{self.path}: cannot open the store: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"{self.path}: another process held the store for over {self.lock_timeout:.0f}s; "
                        "try again when it finishes"
                    ) from exc
            except duckdb.Error as exc:
                raise StoreError(f"{self.path}: not a mine-refine store or not a DuckDB file: {exc}") from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside BEGIN ... COMMIT; any exception rolls everything back."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- schema ------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply pending migrations; returns the versions applied now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        known = _migrations()
        known_versions = {version for version, _ in known}
        applied_now: list[str] = []
        with self.connect() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version VARCHAR PRIMARY KEY, "
                "applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
            )
            applied = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
            unknown = sorted(applied - known_versions)
            if unknown:
                raise StoreError(
                    f"{self.path}: made by a newer mine-refine (schema {unknown[-1]}); "
                    "upgrade mine-refine to open it, or export it with that version"
                )
            for version, path in known:
                if version in applied:
                    continue
                con.execute("BEGIN TRANSACTION")
                try:
                    con.execute(path.read_text(encoding="utf-8"))
                    con.execute("INSERT INTO schema_migrations (version) VALUES (?)", [version])
                except duckdb.Error as exc:
                    con.execute("ROLLBACK")
                    raise StoreError(f"{self.path}: migration {version} failed: {exc}") from exc
                con.execute("COMMIT")
                applied_now.append(version)
        return applied_now

    def schema_version(self) -> str:
        return self.scalar("SELECT max(version) FROM schema_migrations")

    # -- generic access ----------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] | dict | None = None) -> None:
        with self.connect() as con:
            con.execute(sql, params or [])

    def fetchall(self, sql: str, params: Sequence[Any] | dict | None = None) -> list[tuple]:
        with self.connect() as con:
            return con.execute(sql, params or []).fetchall()

    def scalar(self, sql: str, params: Sequence[Any] | dict | None = None) -> Any:
        rows = self.fetchall(sql, params)
        return rows[0][0] if rows else None

    def df(self, sql: str, params: Sequence[Any] | dict | None = None) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute(sql, params or []).df()

    # -- labels ------------------------------------------------------------------------------
    def add_labels(self, records: Sequence[LabelRecord], con: duckdb.DuckDBPyConnection | None = None) -> int:
        """Append labels to the history; rows whose `dedup_key` exists already are skipped.

        Returns the number of rows inserted. Pass `con` to write inside a caller's transaction.
        """
        if not records:
            return 0
        records = with_keys(records)
        frame, flags = labels_frame(records), flags_frame(records)
        if con is not None:
            return _insert_labels(con, frame, flags)
        with self.transaction() as own:
            return _insert_labels(own, frame, flags)

    def current_labels(self, scheme: str | None = None) -> pd.DataFrame:
        """Each pair's current label (see the `current_labels` view for the precedence)."""
        if scheme is None:
            return self.df("SELECT * FROM current_labels ORDER BY pair_id")
        return self.df("SELECT * FROM current_labels WHERE scheme = ? ORDER BY pair_id", [scheme])

    # -- runs --------------------------------------------------------------------------------
    def start_run(self, kind: str, params: dict | None = None, run_id: str | None = None,
                  parent_run_id: str | None = None) -> str:
        run_id = run_id or new_run_id(kind)
        self.execute(
            "INSERT INTO runs (run_id, kind, status, params, parent_run_id, started_at) VALUES (?, ?, 'running', ?, ?, ?) "
            "ON CONFLICT (run_id) DO UPDATE SET status = 'running', finished_at = NULL, error = NULL",
            [run_id, kind, to_json(params or {}), parent_run_id, utcnow()],
        )
        return run_id

    def finish_run(self, run_id: str, status: str = "ok", metrics: dict | None = None, error: str | None = None) -> None:
        self.execute(
            "UPDATE runs SET status = ?, metrics = ?, error = ?, finished_at = ? WHERE run_id = ?",
            [status, to_json(metrics or {}), error, utcnow(), run_id],
        )

    @contextmanager
    def run(self, kind: str, params: dict | None = None, run_id: str | None = None,
            parent_run_id: str | None = None) -> Iterator["RunHandle"]:
        """Record a run: 'running' now, 'ok' with its metrics at the end, 'failed' with the error."""
        handle = RunHandle(self.start_run(kind, params, run_id, parent_run_id))
        try:
            yield handle
        except BaseException as exc:
            self.finish_run(handle.run_id, "failed", handle.metrics, f"{type(exc).__name__}: {exc}")
            raise
        self.finish_run(handle.run_id, "ok", handle.metrics)

    # -- models ------------------------------------------------------------------------------
    def register_model(self, model_id: str, kind: str, path: str | Path, *, stage: str | None = None,
                       parent_model_id: str | None = None, data_hash: str | None = None,
                       metrics: dict | None = None, run_id: str | None = None) -> str:
        self.execute(
            "INSERT INTO models (model_id, kind, stage, path, parent_model_id, data_hash, metrics, run_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model_id) DO UPDATE SET metrics = excluded.metrics, "
            "path = excluded.path",
            [model_id, kind, stage, str(path), parent_model_id, data_hash, to_json(metrics or {}), run_id],
        )
        return model_id


@dataclass
class RunHandle:
    run_id: str
    metrics: dict[str, Any] = field(default_factory=dict)


LABEL_COLUMNS = [
    "pair_id", "scheme", "label", "grade", "probs", "confidence", "source", "author",
    "run_id", "comment", "needs_review", "dedup_key", "created_at",
]


def labels_frame(records: Sequence[LabelRecord]) -> pd.DataFrame:
    now = utcnow()
    rows = []
    seen: set[str] = set()
    for record in records:
        if record.dedup_key is not None:
            if record.dedup_key in seen:
                continue
            seen.add(record.dedup_key)
        row = {name: getattr(record, name) for name in LABEL_COLUMNS}
        row["dedup_key"] = record.dedup_key or f"uuid:{uuid.uuid4().hex}"  # see with_keys
        row["probs"] = to_json(record.probs) if record.probs is not None else None
        row["created_at"] = record.created_at or now
        rows.append(row)
    frame = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    frame["created_at"] = pd.to_datetime(frame["created_at"])
    return frame


FLAG_COLUMNS = ["dedup_key", "flag", "probability", "decision"]


def flags_frame(records: Sequence[LabelRecord]) -> pd.DataFrame:
    """One row per (label, flag) with a probability or a decision, keyed by the label's dedup_key.

    `records` have their keys already (`with_keys`); only the first record of a key counts, as in
    `labels_frame`, and flags of a label that the store skips as a duplicate are dropped with it.
    """
    rows = []
    seen: set[str] = set()
    for record in records:
        if record.dedup_key in seen:
            continue
        seen.add(str(record.dedup_key))
        probabilities, decisions = record.flags or {}, record.flag_decisions or {}
        for name in sorted(set(probabilities) | set(decisions)):
            probability, decision = probabilities.get(name), decisions.get(name)
            rows.append((record.dedup_key, name, None if probability is None else float(probability),
                         None if decision is None else bool(decision)))
    return pd.DataFrame(rows, columns=FLAG_COLUMNS).astype({"probability": "float64", "decision": "object"})


def with_keys(records: Sequence[LabelRecord]) -> list[LabelRecord]:
    """`records`, each with a dedup_key: DuckDB's ON CONFLICT treats NULL keys in one batch as
    conflicting, and a label's flags find their label by its key."""
    return [record if record.dedup_key is not None else replace(record, dedup_key=f"uuid:{uuid.uuid4().hex}")
            for record in records]


def _insert_labels(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame, flags: pd.DataFrame | None = None) -> int:
    con.register("new_labels_frame", frame)
    try:
        columns = ", ".join(LABEL_COLUMNS)
        inserted = con.execute(
            f"INSERT INTO labels ({columns}) SELECT {columns} FROM new_labels_frame "
            "ON CONFLICT (dedup_key) DO NOTHING RETURNING label_id, dedup_key"
        ).fetchall()
    finally:
        con.unregister("new_labels_frame")
    if flags is not None and not flags.empty and inserted:
        new_ids = pd.DataFrame(inserted, columns=["label_id", "dedup_key"])
        insert_frame(con, "label_flags", flags.merge(new_ids, on="dedup_key").astype({"decision": "boolean"}),
                     ["label_id", "flag", "probability", "decision"])
    return len(inserted)


def insert_frame(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame, columns: list[str]) -> None:
    """Append ``frame[columns]`` to ``table`` (both named by code, never by input) on ``con``."""
    view = f"new_{table}_frame"
    con.register(view, frame[columns])
    try:
        names = ", ".join(columns)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {view}")
    finally:
        con.unregister(view)


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# -- catalog writes: insert rows whose key is new, leave existing rows alone -------------------
PRODUCT_COLUMNS = ["product_id", "dataset", "source_id", "title", "description", "brand", "attributes"]
QUERY_COLUMNS = ["query_id", "dataset", "text", "synthetic", "origin"]
PAIR_COLUMNS = ["pair_id", "dataset", "query_id", "product_id", "origin", "raw_rating", "rating_variance"]
_KEYS = {"products": "product_id", "queries": "query_id", "pairs": "pair_id"}


def insert_new(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame, columns: list[str]) -> int:
    """Insert the rows of `frame` whose primary key is not in `table` yet; returns how many."""
    if table not in _KEYS:
        raise ValueError(f"insert_new supports {sorted(_KEYS)}, not {table}")
    if frame.empty:
        return 0
    frame = frame[columns].drop_duplicates(subset=[_KEYS[table]])
    view = f"new_{table}_frame"
    con.register(view, frame)
    try:
        cols = ", ".join(columns)
        # table and column names come from the fixed lists above, never from input
        rows = con.execute(
            f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {view} ON CONFLICT DO NOTHING RETURNING 1"
        ).fetchall()
    finally:
        con.unregister(view)
    return len(rows)
