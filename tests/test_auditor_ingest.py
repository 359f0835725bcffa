"""Event ingest: CSV, JSONL, Parquet (file and folder), OpenSearch UBI; whole-file validation; idempotence."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from auditor.ingest import ingest_events
from labelstore import ids
from labelstore.errors import IngestError, MnrError
from labelstore.store import Store

ROWS = [
    {"session_id": "s1", "query": "Cordless Drill", "product_id": "100", "position": 1, "event_type": "impression", "ts": "2026-01-05 10:00:00"},
    {"session_id": "s1", "query": "Cordless Drill", "product_id": "101", "position": 2, "event_type": "impression", "ts": "2026-01-05 10:00:00"},
    {"session_id": "s1", "query": "Cordless Drill", "product_id": "101", "position": 2, "event_type": "click", "ts": "2026-01-05 10:00:09"},
    {"session_id": "s1", "query": "Cordless Drill", "product_id": "101", "position": 2, "event_type": "purchase", "ts": "2026-01-05 10:05:00"},
]


def _events(store: Store) -> pd.DataFrame:
    return store.df("SELECT * FROM engagement_events ORDER BY ts, product_id, event_type")


def _refused(tmp_path, rows: list[dict], name: str) -> str:
    """Ingest `rows` as a CSV that must be refused whole: the error's message (nothing stored)."""
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(IngestError) as info:
        ingest_events(store, path, dataset="hd")
    assert store.scalar("SELECT count(*) FROM engagement_events") == 0
    return str(info.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_tabular_formats_fill_store_ids(tmp_path, fmt):
    frame = pd.DataFrame(ROWS)
    path = tmp_path / f"events.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.assign(ts=pd.to_datetime(frame["ts"])).to_parquet(path)
    store = Store(tmp_path / "s.duckdb")
    result = ingest_events(store, path, dataset="hd")
    assert result.inserted == 4
    events = _events(store)
    qid = ids.query_id("hd", "Cordless Drill")
    assert set(events["query_id"]) == {qid}
    assert set(events["pair_id"]) == {ids.pair_id(qid, "hd:100"), ids.pair_id(qid, "hd:101")}
    assert not events["simulated"].any()
    assert ingest_events(store, path, dataset="hd").inserted == 0  # same file again adds nothing
    assert len(_events(store)) == 4


def test_parquet_folder_and_column_mapping(tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    frame = pd.DataFrame(ROWS).rename(columns={"product_id": "sku"}).assign(ts=lambda f: pd.to_datetime(f["ts"]))
    frame.iloc[:2].to_parquet(folder / "a.parquet")
    frame.iloc[2:].to_parquet(folder / "b.parquet")
    store = Store(tmp_path / "s.duckdb")
    assert ingest_events(store, folder, dataset="hd", mapping={"product_id": "sku"}).inserted == 4


def test_bad_rows_reject_the_whole_file(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[1]["position"] = 0
    rows[2]["event_type"] = "hover"
    message = _refused(tmp_path, rows, "bad.csv")
    assert "bad.csv" in message and "row 2, field 'position'" in message and "row 3, field 'event_type'" in message


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_conversions_and_clicks_without_a_position_take_their_impressions_and_other_spellings_are_read(tmp_path, fmt):
    """Logs record add-to-carts and purchases on the product page, often clicks too, without the search
    position; and they spell event types their own way."""
    rows = [dict(r) for r in ROWS] + [
        {"session_id": "s1", "query": "Cordless Drill", "product_id": "101", "position": None, "event_type": "Add-To-Cart", "ts": "2026-01-05 10:01:00"},
        {"session_id": "s2", "query": "Cordless Drill", "product_id": "100", "position": 1, "event_type": "view", "ts": "2026-01-06 10:00:00"},
        # the query as logged by another service: other case and spacing, the same query id
        {"session_id": "s2", "query": "cordless  drill", "product_id": "100", "position": None, "event_type": "click", "ts": "2026-01-06 10:00:05"},
        {"session_id": "s2", "query": "Cordless Drill", "product_id": "100", "position": None, "event_type": "cart", "ts": "2026-01-06 10:01:00"},
        {"session_id": "s2", "query": "Cordless Drill", "product_id": "100", "position": None, "event_type": "order", "ts": "2026-01-06 10:09:00"},
        # bought later, in a session where it was never shown: no position to take, still the pair's purchase
        {"session_id": "s3", "query": "Cordless Drill", "product_id": "100", "position": None, "event_type": "purchase", "ts": "2026-01-07 10:00:00"},
    ]
    rows[3]["position"] = None
    path = tmp_path / f"events.{fmt}"
    frame = pd.DataFrame(rows).astype({"position": "Int64"})
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_json(path, orient="records", lines=True)
    store = Store(tmp_path / "s.duckdb")
    assert ingest_events(store, path, dataset="hd").inserted == len(rows)
    events = _events(store)
    position = {(r.session_id, r.product_id[3:], r.event_type): r.position for r in events.itertuples()}
    assert position[("s1", "101", "purchase")] == 2 and position[("s1", "101", "add_to_cart")] == 2
    assert position[("s2", "100", "impression")] == 1 and position[("s2", "100", "click")] == 1
    assert position[("s2", "100", "purchase")] == 1 and pd.isna(position[("s3", "100", "purchase")])

    from auditor.metrics import attach_events, compute_engagement
    from auditor.settings import AuditSettings
    with store.connect() as con:
        attach_events(con)
        metrics = compute_engagement(con, "esci", AuditSettings()).pair_metrics.set_index("pair_id")
    drill = ids.query_id("hd", "Cordless Drill")
    # s3's purchase is stored, but the audit reads purchases given add-to-carts: 2 purchases of 1 add-to-cart count as 1
    assert metrics.loc[ids.pair_id(drill, "hd:100"), ["clicks", "add_to_carts", "purchases"]].tolist() == [1, 1, 1]
    assert metrics.loc[ids.pair_id(drill, "hd:101"), ["clicks", "add_to_carts", "purchases"]].tolist() == [1, 1, 1]


def test_a_sessions_repeated_events_for_one_product_are_kept_once(tmp_path):
    """A double click, a logging retry and results shown again: one look-and-click decision per session and
    product, as the audit's click models assume; otherwise a repeat counts as a click on no impression."""
    rows = [dict(r) for r in ROWS] + [
        {**ROWS[2], "ts": "2026-01-05 10:00:10"},  # double click
        dict(ROWS[1]),  # logging retry, the very same row
        {**ROWS[0], "ts": "2026-01-05 10:02:00"},  # shown again
    ]
    path = tmp_path / "events.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    store = Store(tmp_path / "s.duckdb")
    result = ingest_events(store, path, dataset="hd")
    assert (result.rows_read, result.inserted) == (7, 4)
    events = _events(store)
    assert events.groupby(["session_id", "product_id", "event_type"]).size().max() == 1
    assert str(events.loc[events["event_type"] == "click", "ts"].iloc[0]) == "2026-01-05 10:00:09"  # the first kept


def test_a_click_with_no_position_and_no_impression_to_take_one_from_is_refused(tmp_path):
    rows = [dict(r) for r in ROWS] + [
        {"session_id": "s9", "query": "Cordless Drill", "product_id": "100", "position": None, "event_type": "click", "ts": "2026-01-08 10:00:00"},
        {"session_id": "s9", "query": "Cordless Drill", "product_id": "100", "position": None, "event_type": "impression", "ts": "2026-01-08 10:00:00"},
        {"session_id": "s9", "query": "Cordless Drill", "product_id": "100", "position": "top", "event_type": "impression", "ts": "2026-01-08 10:00:00"},
    ]
    message = _refused(tmp_path, rows, "events.csv")
    assert "row 5, field 'position'" in message and "a click needs a position" in message
    assert "row 6, field 'position'" in message and "an impression needs a position" in message
    assert "row 7, field 'position'" in message and "not an integer" in message


def test_a_log_that_counts_positions_from_0_is_refused_with_a_hint_and_stored_from_1_with_its_base(tmp_path):
    path = tmp_path / "zero.csv"
    pd.DataFrame(ROWS).assign(position=lambda f: f["position"] - 1).to_csv(path, index=False)
    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(IngestError) as error:
        ingest_events(store, path, dataset="hd")
    assert "row 1, field 'position'" in str(error.value) and "--position-base 0" in str(error.value)
    assert len(_events(store)) == 0
    assert ingest_events(store, path, dataset="hd", position_base=0).inserted == 4
    assert sorted(_events(store)["position"]) == [1, 2, 2, 2]
    with pytest.raises(MnrError, match="position base must be 0 or 1"):
        ingest_events(store, path, dataset="hd", position_base=2)


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "short.csv"
    pd.DataFrame(ROWS).drop(columns=["session_id"]).to_csv(path, index=False)
    with pytest.raises(IngestError, match="field 'session_id'"):
        ingest_events(Store(tmp_path / "s.duckdb"), path, dataset="hd")


def test_ubi_queries_and_events(tmp_path):
    queries = [
        {"query_id": "u-1", "user_query": "Cordless Drill", "timestamp": "2026-01-05T10:00:00Z", "client_id": "c1",
         "query_response_id": "r1", "query_response_hit_ids": ["100", "101", "102"]},
        {"query_id": "u-2", "user_query": "paint roller", "timestamp": "2026-01-05T11:00:00Z", "client_id": "c2",
         "query_response_id": "r2", "query_response_hit_ids": ["200"]},
    ]
    events = [
        {"action_name": "click", "query_id": "u-1", "session_id": "sess-1", "client_id": "c1", "timestamp": "2026-01-05T10:00:10Z",
         "message_type": "INFO", "event_attributes": {"object": {"object_id": "101", "object_id_field": "sku"}, "position": {"ordinal": 2}}},
        {"action_name": "add_to_cart", "query_id": "u-1", "session_id": "sess-1", "client_id": "c1", "timestamp": "2026-01-05T10:01:00Z",
         "message_type": "INFO", "event_attributes": {"object": {"object_id": "101", "object_id_field": "sku"}, "position": {"ordinal": 2}}},
        {"action_name": "product_hover", "query_id": "u-1", "session_id": "sess-1", "client_id": "c1", "timestamp": "2026-01-05T10:00:05Z",
         "message_type": "INFO", "event_attributes": {"object": {"object_id": "100", "object_id_field": "sku"}, "position": {"ordinal": 1}}},
    ]
    queries_path, events_path = tmp_path / "ubi_queries.json", tmp_path / "ubi_events.ndjson"
    queries_path.write_text(json.dumps(queries), encoding="utf-8")               # a JSON array
    events_path.write_text("\n".join(json.dumps(e) for e in events), encoding="utf-8")  # newline-delimited
    store = Store(tmp_path / "s.duckdb")
    result = ingest_events(store, events_path, fmt="ubi", ubi_queries=queries_path, dataset="hd")
    assert result.inserted == 4 + 2  # 4 impressions from hit lists, click + add_to_cart (the hover is not engagement)
    frame = _events(store)
    click = frame[frame["event_type"] == "click"].iloc[0]
    assert click["position"] == 2 and click["session_id"] == "sess-1"
    assert click["pair_id"] == ids.pair_id(ids.query_id("hd", "Cordless Drill"), "hd:101")
    impressions = frame[frame["event_type"] == "impression"]
    assert sorted(impressions["position"]) == [1, 1, 2, 3]
    assert ingest_events(store, events_path, fmt="ubi", ubi_queries=queries_path, dataset="hd").inserted == 0
