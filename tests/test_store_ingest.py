"""Ingestion: presets, idempotent re-ingest, and every bad-input case (error text, nothing written)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from labelstore import IngestError, Store
from labelstore.ingest import ingest_file
from labelstore.paths import shared_data_dir

DATA_TABLES = ("products", "queries", "pairs", "labels", "runs")


def counts(store: Store) -> dict[str, int]:
    return {t: store.scalar(f"SELECT count(*) FROM {t}") for t in DATA_TABLES}


def write_csv(path: Path, header: list[str], rows: list[list[object]], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


HD_HEADER = ["id", "product_uid", "product_title", "search_term", "relevance"]
CF_HEADER = ["id", "query", "product_title", "product_description", "median_relevance", "relevance_variance"]
ESCI_HEADER = ["example_id", "query", "query_id", "product_id", "product_locale", "esci_label", "small_version",
               "large_version", "product_title", "product_description", "product_bullet_point", "product_brand",
               "product_color", "product_text", "language"]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store.duckdb")


def test_homedepot_preset_latin1_and_ratings(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "hd.csv", HD_HEADER, [
        [1, 100001, "Simpson Strong-Tie 12-Gauge Angle", "angle bracket", 3],
        [2, 100001, "Simpson Strong-Tie 12-Gauge Angle", "l bracket", 2.5],
        [3, 100002, "BEHR Premium Textured DeckOver 1-gal. Café", "deck over", 1.33],
        [4, 100002, "BEHR Premium Textured DeckOver 1-gal. Café", "deck over", 1.67],  # second rater group
    ], encoding="iso-8859-1")
    result = ingest_file(store, path, preset="homedepot")
    assert result.encoding == "iso-8859-1"
    assert result.inserted == {"products": 2, "queries": 3, "pairs": 3, "labels": 4}
    labels = store.df("SELECT pr.title, l.label, p.raw_rating FROM labels l JOIN pairs p USING (pair_id) "
                      "JOIN products pr USING (product_id) ORDER BY l.label_id")
    assert labels["label"].tolist() == ["relevant", "relevant", "irrelevant", "partial"]
    assert "Café" in labels["title"].iloc[2]
    assert labels["raw_rating"].iloc[2] == pytest.approx((1.33 + 1.67) / 2)


def test_crowdflower_preset_keeps_variance(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "cf.csv", CF_HEADER, [
        [1, "led christmas lights", "Set of 10 LED Train Lights", "<b>Battery</b> operated", 4, 0],
        [2, "led christmas lights", "Red Accent Pillow", "", 1, 0.471],
    ])
    ingest_file(store, path, preset="crowdflower")
    rows = store.df("SELECT label, grade, scheme, raw_rating, rating_variance FROM labels JOIN pairs USING (pair_id) "
                    "ORDER BY grade DESC")
    assert rows["label"].tolist() == ["perfect", "irrelevant"]
    assert set(rows["scheme"]) == {"graded4"}
    assert rows["rating_variance"].tolist() == pytest.approx([0.0, 0.471])


def test_esci_preset_and_idempotent_reingest(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "esci.csv", ESCI_HEADER, [
        [1, "mama koala", "65329", "B01", "us", "E", 0, 1, "Mama Koala Cloth Diapers", "multi\nline", "a", "Mama Koala", "", "", "en"],
        [2, "usb c cable", "11", "B02", "us", "S", 0, 1, "Lightning Cable 6ft", "", "", "Anker", "", "", "en"],
        [3, "usb c cable", "11", "B03", "us", "C", 0, 1, "USB C Wall Charger", "", "", "Anker", "", "", "en"],
    ])
    first = ingest_file(store, path, preset="esci")
    assert first.inserted["labels"] == 3
    before = counts(store)
    second = ingest_file(store, path, preset="esci")
    assert second.inserted == {"products": 0, "queries": 0, "pairs": 0, "labels": 0}
    after = counts(store)
    assert {k: v for k, v in after.items() if k != "runs"} == {k: v for k, v in before.items() if k != "runs"}
    assert set(store.df("SELECT label FROM labels")["label"]) == {"exact", "substitute", "complement"}
    assert store.scalar("SELECT brand FROM products WHERE source_id = 'B02'") == "Anker"


@pytest.mark.shared_data
@pytest.mark.parametrize("preset, file, scheme, rows", [
    ("homedepot", "homedepot/train.csv", "graded3", 59174),
    ("crowdflower", "crowdflower/train.csv", "graded4", 8082),
    ("esci", "esci/esci_sample.csv", "esci", 200),
])
def test_shared_data_presets(store: Store, preset: str, file: str, scheme: str, rows: int) -> None:
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data is absent")
    result = ingest_file(store, data / file, preset=preset)
    assert result.rows_read == rows and result.scheme == scheme
    assert store.scalar("SELECT count(*) FROM labels") == rows
    again = ingest_file(store, data / file, preset=preset)
    assert sum(again.inserted.values()) == 0


def test_generic_format_with_mapping_jsonl_and_parquet(store: Store, tmp_path: Path) -> None:
    rows = [{"q": "cordless drill", "name": "Ryobi 18v drill", "grade_label": "exact", "sku": "1"},
            {"q": "cordless drill", "name": "Drill bit set", "grade_label": "complement", "sku": "2"}]
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    mapping = {"query": "q", "title": "name", "label": "grade_label", "product_id": "sku"}
    assert ingest_file(store, jsonl, mapping=mapping, dataset="shop").inserted["labels"] == 2
    parquet = tmp_path / "labels.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    assert ingest_file(store, parquet, mapping=mapping, dataset="shop").inserted["labels"] == 0


BAD_CASES = {
    "missing column": (["id", "product_uid", "product_title", "relevance"], [[1, 2, "Drill", 3]],
                       ["missing column 'search_term'"]),
    "empty query": (HD_HEADER, [[1, 2, "Drill", "drill", 3], [2, 3, "Saw", "  ", 3]], ["row 2", "'search_term'", "empty query"]),
    "empty title": (HD_HEADER, [[1, 2, "Drill", "drill", 3], [2, 3, "", "saw", 3]], ["row 2", "'product_title'", "empty product title"]),
    "unknown label": (ESCI_HEADER, [[1, "q", "1", "B1", "us", "Maybe", 0, 1, "Title", "", "", "", "", "", "en"]],
                      ["row 1", "'esci_label'", "unknown label 'Maybe'"]),
    "rating out of scale": (HD_HEADER, [[1, 2, "Drill", "drill", 7]], ["row 1", "'relevance'", "outside the homedepot scale"]),
    "not a number": (HD_HEADER, [[1, 2, "Drill", "drill", "high"]], ["row 1", "'relevance'", "not a number"]),
    "duplicate key": (HD_HEADER, [[1, 2, "Drill", "drill", 3], [1, 2, "Drill", "drill", 1]],
                      ["row 2", "'relevance'", "duplicate record id '1'", "row 1 gave 'relevant'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_rejected_whole(store: Store, tmp_path: Path, case: str) -> None:
    header, rows, expected = BAD_CASES[case]
    preset = "esci" if header is ESCI_HEADER else "homedepot"
    good = write_csv(tmp_path / "good.csv", HD_HEADER, [[9, 9, "Hammer", "hammer", 3]])
    ingest_file(store, good, preset="homedepot")
    before = counts(store)
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(IngestError) as caught:
        ingest_file(store, path, preset=preset)
    message = str(caught.value)
    assert str(path) in message and "nothing was written" in message
    for fragment in expected:
        assert fragment in message
    assert counts(store) == before


def test_bad_encoding_names_the_line(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("query,title,label\ndrill,Perceuse sans fil,exact\nsaw,Scie circulaire \u00e0 main,exact\n"
                     .encode("iso-8859-1"))
    with pytest.raises(IngestError) as caught:
        ingest_file(store, path)
    message = str(caught.value)
    assert "line 3" in message and "not valid utf-8" in message and "--encoding" in message
    assert counts(store)["labels"] == 0
    result = ingest_file(store, path, encoding="iso-8859-1")
    assert result.inserted["labels"] == 2


def test_file_without_rows_or_missing_file(store: Store, tmp_path: Path) -> None:
    empty = write_csv(tmp_path / "empty.csv", ["query", "title", "label"], [])
    with pytest.raises(IngestError, match="no data rows"):
        ingest_file(store, empty)
    with pytest.raises(IngestError, match="no such file"):
        ingest_file(store, tmp_path / "nope.csv")


def test_a_product_id_with_two_titles_keeps_the_first_and_says_so(store: Store, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    path = write_csv(tmp_path / "conflict.csv", ["query", "product_id", "title", "label"],
                     [["drill", "p1", "Cordless Drill", "exact"], ["hose", "p1", "Garden Hose", "exact"],
                      ["saw", "p2", "Hand Saw", "exact"], ["saw blade", "p2", "Hand Saw", "complement"]])
    result = ingest_file(store, path)
    assert result.title_conflicts == ["row 2: product 'p1' titled 'Garden Hose', row 1 'Cordless Drill'"]
    assert store.df("SELECT title FROM products ORDER BY title")["title"].tolist() == ["Cordless Drill", "Hand Saw"]
    metrics = json.loads(store.scalar("SELECT metrics FROM runs WHERE kind = 'ingest'"))
    assert metrics["rows_with_conflicting_title"] == 1
    cli = CliRunner().invoke(app, ["--store", str(tmp_path / "cli.duckdb"), "ingest", str(path)])
    assert cli.exit_code == 0, cli.output
    assert "1 title differs from the one kept for its product id" in " ".join(cli.stderr.split())
    # a later file that retitles a stored product: the stored title stays, and the file is told so
    later = write_csv(tmp_path / "later.csv", ["query", "product_id", "title", "label"],
                      [["handsaw", "p2", "Hand Saw 15 in.", "exact"], ["drill", "p1", "Cordless Drill", "exact"]])
    result = ingest_file(store, later, dataset="conflict")
    assert result.title_conflicts == ["product 'p2' titled 'Hand Saw 15 in.' is stored as 'Hand Saw'"]
    assert ingest_file(store, path).title_conflicts == [  # re-ingest: only the conflict inside the file
        "row 2: product 'p1' titled 'Garden Hose', row 1 'Cordless Drill'"]
