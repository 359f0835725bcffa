"""The store: current-label precedence, migrations, export, status, the two-writer guarantee, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

import labelstore.store as store_module
from labelstore import LabelRecord, Store, StoreError
from labelstore.catalog import generate_catalog, write_catalog
from labelstore.export import export_labels
from labelstore.status import store_status

REPO = Path(__file__).resolve().parents[1]
MNR = [sys.executable, "-m", "app.cli"]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=2, seed=1))
    return store


def label(pair_id: str, name: str, grade: int, source: str, at: datetime, author: str = "x") -> LabelRecord:
    return LabelRecord(pair_id=pair_id, scheme="esci", label=name, grade=grade, source=source, author=author,
                       created_at=at)


def test_current_label_precedence(store: Store) -> None:
    pair = store.scalar("SELECT min(pair_id) FROM pairs")
    t0 = datetime(2026, 1, 1)
    store.add_labels([label(pair, "substitute", 2, "llm", t0 + timedelta(hours=1))])
    assert store.current_labels("esci").set_index("pair_id").loc[pair, "source"] == "llm"
    store.add_labels([label(pair, "complement", 1, "human", t0 + timedelta(hours=2), "ann"),
                      label(pair, "exact", 3, "llm", t0 + timedelta(hours=3))])
    current = store.current_labels("esci").set_index("pair_id").loc[pair]
    assert (current["source"], current["label"]) == ("human", "complement")  # older human beats newer LLM
    store.add_labels([label(pair, "irrelevant", 0, "human", t0 + timedelta(hours=4), "ann2")])
    current = store.current_labels("esci").set_index("pair_id").loc[pair]
    assert (current["label"], current["author"]) == ("irrelevant", "ann2")  # newest human wins
    assert store.scalar("SELECT count(*) FROM labels WHERE pair_id = ?", [pair]) == 5  # history kept


def test_dedup_key_makes_writes_idempotent(store: Store) -> None:
    pair = store.scalar("SELECT min(pair_id) FROM pairs")
    record = LabelRecord(pair, "esci", "exact", 3, "llm", "m", dedup_key="run-1:" + pair)
    assert store.add_labels([record, record]) == 1
    assert store.add_labels([record]) == 0


def test_label_source_is_checked() -> None:
    with pytest.raises(ValueError, match="source"):
        LabelRecord("p", "esci", "exact", 3, "robot", "m")


def test_older_store_is_migrated_and_newer_store_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_dir = tmp_path / "old_migrations"
    old_dir.mkdir()
    (old_dir / "0001_init.sql").write_text((store_module.MIGRATIONS_DIR / "0001_init.sql").read_text())
    monkeypatch.setattr(store_module, "MIGRATIONS_DIR", old_dir)
    path = tmp_path / "old.duckdb"
    Store(path)
    monkeypatch.undo()
    reopened = Store(path)
    versions = [r[0] for r in reopened.fetchall("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == sorted(p.stem for p in store_module.MIGRATIONS_DIR.glob("*.sql"))
    reopened.execute("INSERT INTO schema_migrations (version) VALUES ('9999_future')")
    with pytest.raises(StoreError, match="newer mine-refine"):
        Store(path)


def test_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.duckdb"
    junk.write_text("this is not a database")
    with pytest.raises(StoreError, match="junk.duckdb"):
        Store(junk)


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_export_current_and_history(store: Store, tmp_path: Path, suffix: str) -> None:
    pair = store.scalar("SELECT min(pair_id) FROM pairs")
    store.add_labels([label(pair, "exact", 3, "human", datetime(2030, 1, 1), "ann")])
    out = tmp_path / f"labels.{suffix}"
    n_current = export_labels(store, out)
    n_pairs = store.scalar("SELECT count(*) FROM pairs")
    assert n_current == n_pairs
    frame = {"parquet": pd.read_parquet, "csv": pd.read_csv,
             "jsonl": lambda p: pd.read_json(p, lines=True)}[suffix](out)
    assert {"query", "title", "label", "source", "author", "run_id", "probs"} <= set(frame.columns)
    assert frame.set_index("pair_id").loc[pair, "author"] == "ann"
    assert export_labels(store, out, history=True) == n_pairs + 1
    assert not list(tmp_path.glob("*.partial"))


def test_status_counts(store: Store) -> None:
    info = store_status(store)
    assert info.table_counts["pairs"] == info.table_counts["labels"] > 0
    assert set(info.current_distribution["source"]) == {"import"}
    assert info.latest_runs["kind"].tolist() == ["ingest"]


WRITER = """
import sys, time
from pathlib import Path
from labelstore import LabelRecord, Store
path, name, count, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
store = Store(path, lock_timeout=120)
pairs = [r[0] for r in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id")]
(gate / f"ready-{name}").touch()
deadline = time.monotonic() + 120
while len(list(gate.glob("ready-*"))) < 2:  # start barrier: neither writes before both are ready
    assert time.monotonic() < deadline, "the other writer never became ready"
    time.sleep(0.005)
for i in range(count):
    record = LabelRecord(pairs[i % len(pairs)], "esci", "exact", 3, "human" if name == "ui" else "llm", name,
                         dedup_key=f"{name}:{i}")
    assert store.add_labels([record]) == 1
    time.sleep(0.01)  # a writer pauses between labels, as the UI and a batch job do
"""


def test_two_writer_processes_lose_nothing(store: Store, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, str(script), str(store.path), name, "60", str(gate)], env=env,
                                stderr=subprocess.PIPE, text=True) for name in ("batch", "ui")]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
    rows = store.df("SELECT author, count(*) AS n FROM labels WHERE source <> 'import' GROUP BY author")
    assert dict(zip(rows["author"], rows["n"])) == {"batch": 60, "ui": 60}
    # the two writers overlapped: in write order their labels interleave, not one block after the other
    authors = [row[0] for row in store.fetchall("SELECT author FROM labels WHERE source <> 'import' ORDER BY label_id")]
    switches = sum(a != b for a, b in zip(authors, authors[1:]))
    assert switches >= 10, f"the writes hardly interleave ({switches} switches): {''.join(a[0] for a in authors)}"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MNR_STORE", None)
    return subprocess.run([*MNR, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_ingest_status_export_and_errors(tmp_path: Path) -> None:
    data = tmp_path / "pairs.csv"
    data.write_text("query,title,label\ncordless drill,Ryobi 18v drill,exact\ncordless drill,Drill bits,complement\n")
    (tmp_path / "mnr.toml").write_text('[store]\npath = "from-config.duckdb"\n')
    done = run_cli("ingest", str(data), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "from-config.duckdb").exists()  # mnr.toml chose the store
    status = run_cli("status", "--json", cwd=tmp_path)
    assert json.loads(status.stdout)["tables"]["labels"] == 2
    exported = run_cli("--store", "from-config.duckdb", "export", "out.jsonl", cwd=tmp_path)
    assert exported.returncode == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("query,title,label\ndrill,,exact\n")
    failed = run_cli("ingest", str(bad), cwd=tmp_path)
    assert failed.returncode != 0
    assert "row 1" in failed.stderr and "'title'" in failed.stderr and "empty product title" in failed.stderr
    for command in ("ingest", "export", "status"):
        assert run_cli(command, "--help", cwd=tmp_path).returncode == 0
