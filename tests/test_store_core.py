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
import duckdb
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


def flagged_labels(store: Store) -> tuple[str, str, str]:
    """Three pairs: an LLM label with two flag probabilities, a human label that clears one flag, and an LLM label
    with one flag; returns their pair ids."""
    first, second, third = store.df("SELECT pair_id FROM pairs ORDER BY pair_id LIMIT 3")["pair_id"]
    at = datetime(2030, 1, 1)
    store.add_labels([
        LabelRecord(first, "esci", "exact", 3, "llm", "m", flags={"prohibited": 0.8, "adult": 0.1},
                    dedup_key=f"run-1:{first}", created_at=at),
        LabelRecord(second, "esci", "exact", 3, "llm", "m", flags={"prohibited": 0.9, "adult": 0.7},
                    dedup_key=f"run-1:{second}", created_at=at),
        LabelRecord(second, "esci", "exact", 3, "human", "ann", flags=None, flag_decisions={"prohibited": False},
                    created_at=at + timedelta(hours=1)),
        LabelRecord(third, "esci", "substitute", 2, "llm", "m", flags={"prohibited": 0.2},
                    dedup_key=f"run-1:{third}", created_at=at),
    ])
    return first, second, third


def test_label_flags_round_trip_and_a_duplicate_label_brings_no_duplicate_flags(store: Store) -> None:
    first, second, _ = flagged_labels(store)
    rows = store.df("SELECT l.pair_id, l.source, f.flag, f.probability, f.decision FROM label_flags f "
                    "JOIN labels l USING (label_id) ORDER BY l.pair_id, l.source, f.flag")
    assert len(rows) == 6
    mine = rows[rows["pair_id"] == first].set_index("flag")
    assert mine.loc["prohibited", "probability"] == 0.8 and mine.loc["adult", "probability"] == 0.1
    assert mine["decision"].isna().all()
    human = rows[(rows["pair_id"] == second) & (rows["source"] == "human")]
    assert human[["flag", "decision"]].values.tolist() == [["prohibited", False]] and human["probability"].isna().all()
    again = LabelRecord(first, "esci", "irrelevant", 0, "llm", "m", flags={"prohibited": 0.0, "adult": 0.0},
                        dedup_key=f"run-1:{first}")
    assert store.add_labels([again, again]) == 0
    assert store.scalar("SELECT count(*) FROM label_flags") == 6, "the skipped duplicate's flags are skipped too"
    current = store.df("SELECT pair_id, flag, flagged FROM current_flags ORDER BY pair_id, flag")
    by_key = {(row.pair_id, row.flag): bool(row.flagged) for row in current.itertuples()}
    assert by_key[(first, "prohibited")] and not by_key[(first, "adult")]
    # the human label decided prohibited; it left adult alone, so the LLM label's 0.7 still stands
    assert by_key[(second, "prohibited")] is False and by_key[(second, "adult")] is True
    with pytest.raises(ValueError, match="flag 'adult' probability 1.5"):
        LabelRecord(first, "esci", "exact", 3, "llm", "m", flags={"adult": 1.5})


def test_a_flag_decision_stands_until_a_newer_decision_whatever_label_comes_later(store: Store) -> None:
    """A flag is about the pair: a later label that does not mention it (an adjudication, a second reviewer
    who left it untouched, an LLM relabel with --no-flags, an import under the LLM's precedence) keeps it."""
    from labelstore.flags import current_flags, flagged_product_ids

    one, two = store.df("SELECT pair_id FROM pairs ORDER BY pair_id LIMIT 2")["pair_id"]
    at = datetime(2030, 1, 1)

    def state(pair_id: str) -> tuple:
        row = current_flags(store, [pair_id]).set_index("flag").loc["prohibited"]
        return bool(row["flagged"]), row["decision"], row["probability"], row["source"]

    store.add_labels([LabelRecord(one, "esci", "exact", 3, "llm", "m", flags={"prohibited": 0.9}, created_at=at),
                      LabelRecord(one, "esci", "exact", 3, "import", "dataset", flag_decisions={"prohibited": False},
                                  created_at=at + timedelta(hours=1))])
    assert state(one) == (False, False, 0.9, "import"), "an imported decision overrules a current LLM label"
    store.add_labels([LabelRecord(one, "esci", "exact", 3, "llm", "m2", created_at=at + timedelta(hours=2)),
                      LabelRecord(one, "esci", "substitute", 2, "human", "ann", flag_decisions={"prohibited": True},
                                  created_at=at + timedelta(hours=3))])
    assert state(one) == (True, True, 0.9, "human")
    store.add_labels([LabelRecord(one, "esci", "complement", 1, "human", "admin", created_at=at + timedelta(hours=4))])
    assert state(one) == (True, True, 0.9, "human"), "an adjudication without flags keeps the decision"
    clear = LabelRecord(one, "esci", "complement", 1, "human", "bob", flag_decisions={"prohibited": False},
                        created_at=at + timedelta(hours=5))
    store.add_labels([clear])
    assert state(one)[:2] == (False, False)
    cleared_id = store.scalar("SELECT label_id FROM labels WHERE author = 'bob'")
    store.execute("INSERT INTO review_events (event_id, action, pair_id, scheme, annotator, label_id) "
                  "VALUES ('u1', 'undo', ?, 'esci', 'bob', ?)", [one, cleared_id])
    assert state(one)[:2] == (True, True), "an undone decision does not count"
    # a product is flagged by its newest decision on any pair: a clear on one pair overrules a probability on another
    product = store.scalar("SELECT product_id FROM pairs WHERE pair_id = ?", [one])
    store.execute("UPDATE pairs SET product_id = ? WHERE pair_id = ?", [product, two])
    store.add_labels([LabelRecord(two, "esci", "exact", 3, "llm", "m", flags={"prohibited": 0.97},
                                  created_at=at + timedelta(hours=6))])
    assert product in flagged_product_ids(store)
    store.add_labels([LabelRecord(two, "esci", "exact", 3, "human", "cat", flag_decisions={"prohibited": False},
                                  created_at=at + timedelta(hours=7))])
    assert product not in flagged_product_ids(store)
    # fine-tuning learns the pair's standing decision, not the picked label's own (the adjudication has none)
    from annotator.evaluation import labelled_pairs
    from app.labeler_training import with_flag_decisions

    picked = with_flag_decisions(store, labelled_pairs(store, "esci", ["human"]), "esci", ["prohibited"])
    assert picked.set_index("pair_id").loc[one, "flags"] == {"prohibited": True}


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_export_has_a_probability_and_a_decision_column_per_flag(store: Store, tmp_path: Path, suffix: str) -> None:
    first, second, third = flagged_labels(store)
    read = {"parquet": pd.read_parquet, "csv": pd.read_csv}[suffix]
    out = tmp_path / f"labels.{suffix}"
    export_labels(store, out)
    current = read(out).set_index("pair_id")
    assert list(current.columns[-4:]) == ["flag_adult", "flag_adult_decision", "flag_prohibited",
                                          "flag_prohibited_decision"]
    assert current.loc[first, "flag_prohibited"] == 0.8 and current.loc[first, "flag_adult"] == 0.1
    assert pd.isna(current.loc[first, "flag_prohibited_decision"])
    # the human decision beside the LLM probability it overrules, and the LLM's adult flag the human left alone
    assert not current.loc[second, "flag_prohibited_decision"] and current.loc[second, "flag_prohibited"] == 0.9
    assert current.loc[second, "flag_adult"] == 0.7
    assert pd.isna(current.loc[third, "flag_adult"]) and current.loc[third, "flag_prohibited"] == 0.2
    assert current["flag_prohibited"].notna().sum() == 3
    assert current["flag_adult"].notna().sum() == 2, "pairs without flags have empty flag columns"
    export_labels(store, out, history=True)
    history = read(out)
    llm_second = history[(history["pair_id"] == second) & (history["source"] == "llm")].iloc[0]
    assert llm_second["flag_adult"] == 0.7 and llm_second["flag_prohibited"] == 0.9
    assert history["flag_prohibited"].notna().sum() == 3 and history["flag_prohibited_decision"].notna().sum() == 1
    export_labels(store, out, source="import")
    assert not [column for column in read(out).columns if column.startswith("flag_")], "no flag, no flag column"


def test_status_counts_flags_of_current_labels(store: Store) -> None:
    flagged_labels(store)
    flags = store_status(store).flags.set_index("flag")
    assert flags.loc["prohibited", ["pairs", "flagged", "decided_set", "decided_cleared"]].tolist() == [3, 1, 0, 1]
    # the second pair's human label decided only prohibited: its LLM label's adult 0.7 still stands
    assert flags.loc["adult", ["pairs", "flagged", "decided_set", "decided_cleared"]].tolist() == [2, 1, 0, 0]
    assert store_status(store).table_counts["label_flags"] == 6


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


def test_opening_retries_while_another_process_holds_or_releases_the_file() -> None:
    from labelstore.store import _is_lock_error

    assert _is_lock_error(duckdb.IOException('IO Error: Could not set lock on file "s.duckdb": Conflicting lock'))
    assert _is_lock_error(duckdb.IOException("IO Error: Could not read enough bytes from file \"s.duckdb\""))
    assert not _is_lock_error(duckdb.IOException("IO Error: Cannot open file \"s.duckdb\": Permission denied"))


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


def run_cli(*args: str, cwd: Path, columns: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"COLUMNS": str(columns)} if columns else {})}
    env.pop("MNR_STORE", None)
    return subprocess.run([*MNR, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_ingest_status_export_and_errors(tmp_path: Path) -> None:
    data = tmp_path / "pairs.csv"
    data.write_text("query,title,label,banned\ncordless drill,Ryobi 18v drill,exact,no\n"
                    "cordless drill,Drill bits,complement,yes\n")
    (tmp_path / "mnr.toml").write_text('[store]\npath = "from-config.duckdb"\n')
    done = run_cli("ingest", str(data), "--flag", "prohibited=banned", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "from-config.duckdb").exists()  # mnr.toml chose the store
    status = run_cli("status", "--json", cwd=tmp_path)
    assert json.loads(status.stdout)["tables"]["labels"] == 2
    assert json.loads(status.stdout)["flags"] == [{"scheme": "esci", "flag": "prohibited", "pairs": 2, "flagged": 1,
                                                  "decided_set": 1, "decided_cleared": 1}]
    table = run_cli("status", cwd=tmp_path, columns=200)
    assert "Policy flags of the pairs" in table.stdout
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.stdout.splitlines()]
    assert ["esci", "prohibited", "2", "1", "1", "1"] in cells, table.stdout
    exported = run_cli("--store", "from-config.duckdb", "export", "out.jsonl", cwd=tmp_path)
    assert exported.returncode == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    rows = pd.read_json(tmp_path / "out.jsonl", lines=True).set_index("title")
    assert rows.loc["Drill bits", "flag_prohibited_decision"] and not rows.loc["Ryobi 18v drill", "flag_prohibited_decision"]
    bad = tmp_path / "bad.csv"
    bad.write_text("query,title,label\ndrill,,exact\n")
    failed = run_cli("ingest", str(bad), cwd=tmp_path)
    assert failed.returncode != 0
    assert "row 1" in failed.stderr and "'title'" in failed.stderr and "empty product title" in failed.stderr
    for command in ("ingest", "export", "status"):
        assert run_cli(command, "--help", cwd=tmp_path).returncode == 0
