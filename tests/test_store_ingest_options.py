"""Ingest of unlabelled files and of ratings on the user's own scale (`--rating-map`, [ingest] rating_map)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labelstore import IngestError, Store
from labelstore.ingest import ingest_file
from test_store_ingest import write_csv

REPO = Path(__file__).resolve().parents[1]
DATA_TABLES = ("products", "queries", "pairs", "labels", "runs")
MY_HEADER = ["id", "query", "title", "rating"]
MY_ROWS = [[1, "cordless drill", "Ryobi 18V cordless drill", 3], [2, "cordless drill", "Corded hammer drill", 2],
           [3, "cordless drill", "Garden hose 50 ft", 1], [4, "tile saw", "Wet tile saw 7 in", 2.6]]


def counts(store: Store) -> dict[str, int]:
    return {t: store.scalar(f"SELECT count(*) FROM {t}") for t in DATA_TABLES}


def labels_by_title(store: Store) -> dict[str, str]:
    frame = store.df("SELECT pr.title, l.label FROM labels l JOIN pairs p USING (pair_id) JOIN products pr USING (product_id)")
    return dict(zip(frame["title"], frame["label"]))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store.duckdb")


# -- unlabelled files ---------------------------------------------------------------------------------
def test_unlabelled_file_adds_pairs_without_labels_idempotently(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "catalog.csv", ["query", "title", "brand"],
                     [["cordless drill", "Ryobi 18V drill", "Ryobi"], ["tile saw", "Wet tile saw", ""],
                      ["cordless drill", "Ryobi 18V drill", "Ryobi"]])
    result = ingest_file(store, path)
    assert not result.labelled and result.dataset == "catalog"
    assert result.inserted == {"products": 2, "queries": 2, "pairs": 2, "labels": 0}
    assert store.scalar("SELECT count(*) FROM pairs WHERE raw_rating IS NULL") == 2
    assert ingest_file(store, path).inserted == {"products": 0, "queries": 0, "pairs": 0, "labels": 0}


def test_unlabelled_file_is_still_validated_whole(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", ["query", "title"], [["drill", "Ryobi drill"], ["saw", "  "]])
    with pytest.raises(IngestError) as caught:
        ingest_file(store, path)
    assert "row 2, field 'title': empty product title" in str(caught.value)
    assert counts(store) == dict.fromkeys(DATA_TABLES, 0)


def test_unlabeled_option_ignores_a_label_column_and_a_missing_one_says_so(store: Store, tmp_path: Path) -> None:
    test_csv = write_csv(tmp_path / "test.csv", ["id", "product_uid", "product_title", "search_term"],
                         [[1, 100001, "Simpson Strong-Tie Angle", "angle bracket"]])
    with pytest.raises(IngestError, match=r"missing column 'relevance'.*--unlabeled"):
        ingest_file(store, test_csv, preset="homedepot")
    result = ingest_file(store, test_csv, preset="homedepot", unlabeled=True)
    assert not result.labelled and result.inserted["pairs"] == 1 and result.inserted["labels"] == 0
    labelled = write_csv(tmp_path / "l.csv", ["query", "title", "label"], [["drill", "Ryobi drill", "exact"]])
    assert ingest_file(store, labelled, unlabeled=True).inserted["labels"] == 0


# -- rating maps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rating_map", ["1=irrelevant, 2=partial, 3=relevant, 2.6=partial",
                                        "<1.5=irrelevant,<2.5=P,<=2.7=partial,>2.7=relevant"])
def test_rating_map_exact_values_and_thresholds(store: Store, tmp_path: Path, rating_map: str) -> None:
    path = write_csv(tmp_path / "myfile.csv", MY_HEADER, MY_ROWS)
    result = ingest_file(store, path, scheme="graded3", rating_map=rating_map)
    assert result.labelled and result.inserted["labels"] == 4
    assert labels_by_title(store) == {"Ryobi 18V cordless drill": "relevant", "Corded hammer drill": "partial",
                                      "Garden hose 50 ft": "irrelevant", "Wet tile saw 7 in": "partial"}
    params = store.scalar("SELECT params FROM runs WHERE kind = 'ingest'")
    assert "rating_map" in params and "irrelevant" in params
    assert store.scalar("SELECT raw_rating FROM pairs JOIN products USING (product_id) WHERE title = 'Wet tile saw 7 in'") \
        == pytest.approx(2.6)


def test_rating_map_overrides_the_schemes_own_map(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "hd.csv", ["id", "product_uid", "product_title", "search_term", "relevance"],
                     [[1, 100001, "Angle bracket", "angle bracket", 2.33]])
    ingest_file(store, path, preset="homedepot", rating_map="<2=irrelevant,>=2=relevant")
    assert labels_by_title(store) == {"Angle bracket": "relevant"}


def test_missing_rating_map_error_says_how_to_fix_it(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "myfile.csv", MY_HEADER, MY_ROWS)
    with pytest.raises(IngestError) as caught:
        ingest_file(store, path, scheme="graded3")
    message = " ".join(str(caught.value).split())
    assert "scheme 'graded3' has no rating map for 'myfile'" in message and "field 'rating'" in message
    assert "--rating-map '1=irrelevant,2=partial,3=relevant'" in message and "[ingest] rating_map" in message
    assert len(caught.value.problems) == 1, "one problem for the file, not one per row"
    assert counts(store) == dict.fromkeys(DATA_TABLES, 0)


@pytest.mark.parametrize("rating_map, expected", [
    ("", "empty rating map"),
    ("1=irrelevant,2=okay,3=relevant", "rating map item '2=okay': unknown label 'okay' for scheme 'graded3'"),
    ("one=irrelevant", "'one' is not a number or <N, <=N, >N, >=N"),
    ("1=irrelevant,relevant", "rating map item 'relevant' is not RULE=LABEL"),
    (">=relevant", "rating map item '>=relevant' is not RULE=LABEL"),
    ("1=irrelevant,1=partial", "gives 1 two labels: 'irrelevant' and 'partial'"),
])
def test_bad_rating_map_is_a_clear_error_before_anything_is_written(store: Store, tmp_path: Path, rating_map: str,
                                                                    expected: str) -> None:
    path = write_csv(tmp_path / "myfile.csv", MY_HEADER, MY_ROWS)
    with pytest.raises(IngestError) as caught:
        ingest_file(store, path, scheme="graded3", rating_map=rating_map)
    message = str(caught.value)
    assert str(path) in message and "bad rating map" in message and expected in message
    assert counts(store) == dict.fromkeys(DATA_TABLES, 0)


def test_rating_no_rule_matches_names_row_and_field(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "myfile.csv", MY_HEADER, MY_ROWS)
    with pytest.raises(IngestError) as caught:
        ingest_file(store, path, scheme="graded3", rating_map="1=irrelevant,2=partial,3=relevant")
    assert "row 4, field 'rating': rating 2.6 matches no rule of the rating map" in str(caught.value)
    assert counts(store) == dict.fromkeys(DATA_TABLES, 0)


# -- the command line ---------------------------------------------------------------------------------
def _mnr(tmp_path: Path, *args: str, config: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MNR_CONFIG": str(tmp_path / "mnr.toml"), "COLUMNS": "200"}
    if config is not None:
        (tmp_path / "mnr.toml").write_text(config, encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "app.cli", "--store", str(tmp_path / "cli.duckdb"), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli_rating_map_flag_config_and_errors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "myfile.csv", MY_HEADER, MY_ROWS)
    missing = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3")
    assert missing.returncode == 2 and "--rating-map" in " ".join(missing.stderr.split())
    bad = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3", "--rating-map", "1=nope")
    assert bad.returncode == 2 and "unknown label 'nope'" in " ".join(bad.stderr.split())
    done = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3",
                config='[ingest]\nrating_map = "<1.5=irrelevant,<2.7=partial,>=2.7=relevant"\n')
    assert done.returncode == 0, done.stderr
    assert "4 labels" in " ".join(done.stdout.split())
    flag_wins = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3", "--dataset", "other",
                     "--rating-map", "1=irrelevant,2=partial,3=relevant")
    assert flag_wins.returncode == 2 and "row 4" in flag_wins.stderr, "the flag, not the config, was used"
    bad_config = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3", config="[ingest]\nrating_map = 3\n")
    assert bad_config.returncode == 2 and "rating_map in mnr.toml must be a string" in " ".join(bad_config.stderr.split())
    helptext = _mnr(tmp_path, "ingest", "--help")
    assert "<1.5=irrelevant,<2.5=partial,>=2.5=relevant" in helptext.stdout and "[ingest] rating_map" in helptext.stdout


def test_a_rating_that_is_not_a_number_is_reported_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    path = write_csv(tmp_path / "ratings.csv", ["query", "title", "rating"], [["drill", "Ryobi drill", "high"]])
    with pytest.raises(IngestError) as error:
        ingest_file(store, path, scheme="graded3", rating_map="1=irrelevant,2=partial,3=relevant")
    message = str(error.value)
    assert "not a number: 'high'" in message and "empty rating" not in message


# -- human flag decisions (--flag name=column) ---------------------------------------------------------
FLAG_HEADER = ["query", "title", "label", "is_prohibited", "is_adult"]
FLAG_ROWS = [["hunting knife", "Fixed blade hunting knife", "relevant", "yes", ""],
             ["hunting knife", "Folding pocket knife", "partial", "No", "0"],
             ["garden hose", "Garden hose 50 ft", "relevant", "", ""],
             ["lingerie", "Lace lingerie set", "irrelevant", "false", "TRUE"]]
FLAG_COLUMNS = {"prohibited": "is_prohibited", "adult": "is_adult"}


def flag_rows(store: Store) -> dict[tuple[str, str], bool]:
    frame = store.df("SELECT pr.title, f.flag, f.decision, f.probability FROM label_flags f JOIN labels l USING (label_id) "
                     "JOIN pairs p USING (pair_id) JOIN products pr USING (product_id)")
    assert frame["probability"].isna().all(), "a human decision carries no probability"
    return {(row.title, row.flag): bool(row.decision) for row in frame.itertuples()}


def test_flag_decisions_are_stored_with_the_imported_labels_and_reingest_adds_nothing(store: Store,
                                                                                    tmp_path: Path) -> None:
    path = write_csv(tmp_path / "flags.csv", FLAG_HEADER, FLAG_ROWS)
    result = ingest_file(store, path, scheme="graded3", flags=FLAG_COLUMNS)
    assert result.inserted["labels"] == 4
    assert flag_rows(store) == {("Fixed blade hunting knife", "prohibited"): True,
                                ("Folding pocket knife", "prohibited"): False, ("Folding pocket knife", "adult"): False,
                                ("Lace lingerie set", "prohibited"): False, ("Lace lingerie set", "adult"): True}
    current = store.df("SELECT flag, flagged FROM current_flags WHERE decision")
    assert sorted(current["flag"]) == ["adult", "prohibited"] and current["flagged"].all()
    assert ingest_file(store, path, scheme="graded3", flags=FLAG_COLUMNS).inserted["labels"] == 0
    assert store.scalar("SELECT count(*) FROM label_flags") == 5, "re-ingest adds no flag rows"
    params = store.df("SELECT params, metrics FROM runs WHERE kind = 'ingest' ORDER BY started_at LIMIT 1").iloc[0]
    assert '"prohibited": "is_prohibited"' in params["params"] and '"rows_with_flag_decisions": 3' in params["metrics"]


def test_flag_decisions_added_later_arrive_on_new_labels(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "flags.csv", FLAG_HEADER, FLAG_ROWS)
    assert ingest_file(store, path, scheme="graded3").inserted["labels"] == 4
    assert store.scalar("SELECT count(*) FROM label_flags") == 0
    # the same judgments with decisions: only the three rows that carry one are new labels
    assert ingest_file(store, path, scheme="graded3", flags=FLAG_COLUMNS).inserted["labels"] == 3
    assert len(flag_rows(store)) == 5


def test_flag_decisions_from_parquet_booleans(store: Store, tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "flags.parquet"
    pd.DataFrame({"query": ["knife", "knife"], "title": ["Hunting knife", "Bread knife"], "label": ["relevant"] * 2,
                  "banned": [True, None]}).to_parquet(path)
    ingest_file(store, path, scheme="graded3", flags={"prohibited": "banned"})
    assert flag_rows(store) == {("Hunting knife", "prohibited"): True}


def test_cli_refuses_a_flag_no_policy_declares(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "flags.csv", FLAG_HEADER, FLAG_ROWS)
    typo = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3", "--flag", "prohibted=is_prohibited")
    message = " ".join(typo.stderr.split())
    assert typo.returncode == 2 and "flag(s) prohibted declared by no built-in policy" in message
    assert "adult, pesticide, prohibited" in message and not (tmp_path / "cli.duckdb").exists()
    narrow = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3", "--flag", "adult=is_adult",
                  "--policy", "home-improvement")
    assert narrow.returncode == 2 and "not declared by policy 'home-improvement' (declared: pesticide)" in " ".join(
        narrow.stderr.split())
    done = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3", "--flag", "adult=is_adult", "--policy", "marketplace")
    assert done.returncode == 0, done.stderr


def test_an_exported_flag_decision_column_ingests_again(store: Store, tmp_path: Path) -> None:
    """An export writes decisions as a nullable boolean: its empty cells (pd.NA) are no decision."""
    import pandas as pd

    from labelstore.export import export_labels

    ingest_file(store, write_csv(tmp_path / "flags.csv", FLAG_HEADER, FLAG_ROWS), scheme="graded3", flags=FLAG_COLUMNS)
    export_labels(store, tmp_path / "labels.parquet")
    exported = pd.read_parquet(tmp_path / "labels.parquet")
    assert exported["flag_adult_decision"].isna().sum() == 2
    other = Store(tmp_path / "other.duckdb")
    ingest_file(other, tmp_path / "labels.parquet", scheme="graded3", dataset="again",
                flags={"prohibited": "flag_prohibited_decision", "adult": "flag_adult_decision"})
    assert flag_rows(other) == flag_rows(store)


def test_bad_flag_value_names_file_row_and_field_and_writes_nothing(store: Store, tmp_path: Path) -> None:
    rows = [row[:] for row in FLAG_ROWS]
    rows[2][3] = "maybe"
    path = write_csv(tmp_path / "flags.csv", FLAG_HEADER, rows)
    with pytest.raises(IngestError) as caught:
        ingest_file(store, path, scheme="graded3", flags=FLAG_COLUMNS)
    assert (f"{path}: row 3, field 'is_prohibited': flag 'prohibited': 'maybe' is not a decision "
            "(use yes/no, true/false or 1/0") in str(caught.value)
    assert counts(store) == dict.fromkeys(DATA_TABLES, 0)
    with pytest.raises(IngestError, match=r"missing column 'nsfw' \(needed for flag 'adult'\)"):
        ingest_file(store, path, scheme="graded3", flags={"adult": "nsfw"})
    with pytest.raises(IngestError, match="flag decisions belong to labels"):
        ingest_file(store, path, scheme="graded3", flags={"prohibited": "is_prohibited"}, unlabeled=True)
    assert counts(store) == dict.fromkeys(DATA_TABLES, 0)


def test_cli_flag_option_and_its_errors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "flags.csv", FLAG_HEADER, FLAG_ROWS)
    bad_name = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3", "--flag", "Prohibited=is_prohibited")
    assert bad_name.returncode == 2 and "'Prohibited' is not a flag name" in " ".join(bad_name.stderr.split())
    done = _mnr(tmp_path, "ingest", str(path), "--scheme", "graded3", "--flag", "prohibited=is_prohibited",
                "--flag", "adult=is_adult")
    assert done.returncode == 0, done.stderr
    assert Store(tmp_path / "cli.duckdb").scalar("SELECT count(*) FROM label_flags") == 5
    rows = [row[:] for row in FLAG_ROWS]
    rows[0][4] = "2"
    bad = _mnr(tmp_path, "ingest", str(write_csv(tmp_path / "bad.csv", FLAG_HEADER, rows)), "--scheme", "graded3",
               "--flag", "adult=is_adult")
    assert bad.returncode == 2 and "row 1, field 'is_adult': flag 'adult': '2' is not a decision" in " ".join(
        bad.stderr.split())
