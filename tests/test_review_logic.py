"""Review UI data logic on a real store: queue priority, decisions, undo, identity, agreement, concurrency."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.review.agreement import annotator_vs_llm, between_annotators, confusion, decisions_frame, kappa_trend
from app.review.decisions import record_decision, record_skip, show, undo_decision, undo_last
from app.review.item import load_item
from app.review.queue import QueueFilters, load_queue, queue_counts
from app.review.settings import IdentityError, ReviewSettings
from labelstore import Store
from labelstore.errors import MnrError, SchemeError
from labelstore.schemes import load_scheme
from test_review_support import ReviewFixture, fixture, llm_label, template  # noqa: F401  (fixtures)

NO_OVERLAP = ReviewSettings(overlap=0.0)
ESCI = load_scheme("esci")


def decide(store: Store, pair_id: str, annotator: str, label: str, source: str = "test", comment: str | None = None):
    shown = show(load_item(store, pair_id, "esci"), source)
    return record_decision(store, shown, annotator, label, comment)


def test_queue_order_follows_the_priority_tiers(fixture: ReviewFixture) -> None:
    queue = load_queue(fixture.store, "alice", settings=NO_OVERLAP)
    assert list(queue["pair_id"]) == fixture.expected_order
    assert list(queue["source"]) == ["audit", "audit", "uncertain", "uncertain", "disputed", "mined"]
    assert fixture.confident not in set(queue["pair_id"])  # a confident LLM label needs no human
    assert queue_counts(queue) == {"flagged": 0, "audit": 2, "uncertain": 2, "disputed": 1, "overlap": 0, "mined": 1, "total": 6}
    assert queue.loc[queue["pair_id"] == fixture.disputed, "reason"].item() == "human said exact, LLM says irrelevant"


def test_queue_leaves_out_own_decisions_and_puts_skips_last(fixture: ReviewFixture) -> None:
    store = fixture.store
    decide(store, fixture.audit_high, "alice", "exact")
    record_skip(store, show(load_item(store, fixture.audit_low, "esci"), "audit"), "alice")
    alice = load_queue(store, "alice", settings=NO_OVERLAP)
    assert list(alice["pair_id"]) == fixture.expected_order[2:] + [fixture.audit_low]
    assert alice["skipped"].tolist() == [False] * 4 + [True]
    # carol decided the disputed pair: it is not hers to decide again
    assert fixture.disputed not in set(load_queue(store, "carol", settings=NO_OVERLAP)["pair_id"])
    # bob still gets the audit item alice skipped, and the one she decided only as overlap
    bob = load_queue(store, "bob", settings=ReviewSettings(overlap=1.0))
    assert bob.set_index("pair_id").loc[fixture.audit_high, "source"] == "overlap"
    assert bob.set_index("pair_id").loc[fixture.audit_low, "source"] == "audit"
    assert fixture.audit_high not in set(load_queue(store, "bob", settings=NO_OVERLAP)["pair_id"])


def test_queue_filters(fixture: ReviewFixture) -> None:
    store = fixture.store
    only_uncertain = load_queue(store, "alice", QueueFilters(sources=("uncertain",)), NO_OVERLAP)
    assert list(only_uncertain["pair_id"]) == [fixture.uncertain_low, fixture.uncertain_mid]
    complement = load_queue(store, "alice", QueueFilters(label="complement"), NO_OVERLAP)
    assert list(complement["pair_id"]) == [fixture.uncertain_mid]
    query = load_queue(store, "alice", settings=NO_OVERLAP)["query"].iloc[0]
    by_text = load_queue(store, "alice", QueueFilters(query_text=query.upper()), NO_OVERLAP)
    assert fixture.audit_high in set(by_text["pair_id"]) and (by_text["query"].str.lower() == query.lower()).all()
    assert load_queue(store, "alice", QueueFilters(dataset="no-such-dataset"), NO_OVERLAP).empty


def test_decision_is_appended_with_provenance_and_retry_adds_nothing(fixture: ReviewFixture) -> None:
    store = fixture.store
    shown = show(load_item(store, fixture.uncertain_low, "esci"), "uncertain")
    first = record_decision(store, shown, " alice ", "E", comment="brand matches")
    retry = record_decision(store, shown, "alice", "exact", comment="brand matches")
    assert first.written and not retry.written and first.label_id == retry.label_id
    assert not first.changed_since_shown and not retry.changed_since_shown
    rows = store.fetchall("SELECT label, grade, source, author, comment FROM labels WHERE dedup_key = ?",
                          [shown.dedup_key])
    assert rows == [("exact", 3, "human", "alice", "brand matches")]
    current = store.current_labels("esci").set_index("pair_id").loc[fixture.uncertain_low]
    assert (current["label"], current["source"]) == ("exact", "human")
    events = store.fetchall("SELECT action, annotator, queue_source, label_id FROM review_events")
    assert events == [("decide", "alice", "uncertain", first.label_id)]
    # the LLM label it overrides is still in the history
    assert store.scalar("SELECT count(*) FROM labels WHERE pair_id = ? AND source = 'llm'", [fixture.uncertain_low]) == 1


def test_no_identity_no_write(fixture: ReviewFixture) -> None:
    store = fixture.store
    shown = show(load_item(store, fixture.audit_high, "esci"), "audit")
    before = store.scalar("SELECT count(*) FROM labels")
    for nobody in (None, "", "   "):
        with pytest.raises(IdentityError, match="no decision is written without one"):
            record_decision(store, shown, nobody, "exact")
    with pytest.raises(IdentityError, match="not valid"):
        record_decision(store, shown, "alice; drop table", "exact")
    with pytest.raises(IdentityError, match="allow-list"):
        record_decision(store, shown, "mallory", "exact", allow=("alice", "bob"))
    with pytest.raises(IdentityError):
        record_skip(store, shown, None)
    with pytest.raises(SchemeError, match="unknown label 'great'"):
        record_decision(store, shown, "alice", "great")
    assert store.scalar("SELECT count(*) FROM labels") == before
    assert store.scalar("SELECT count(*) FROM review_events") == 0
    assert record_decision(store, shown, "bob", "exact", allow=("alice", "bob")).written


def test_changed_since_shown_is_saved_and_reported(fixture: ReviewFixture) -> None:
    store = fixture.store
    shown = show(load_item(store, fixture.audit_high, "esci"), "audit")
    store.add_labels([llm_label(fixture.audit_high, "substitute", 0.8, author="llm:batch")])
    result = record_decision(store, shown, "alice", "complement")
    assert result.written and result.changed_since_shown
    assert result.newer_labels == [("llm", "substitute", "llm:batch")]
    assert "llm label 'substitute' by llm:batch" in result.change_message()
    assert store.scalar("SELECT changed_since_shown FROM review_events WHERE label_id = ?", [result.label_id])
    current = store.current_labels("esci").set_index("pair_id").loc[fixture.audit_high]
    assert (current["label"], current["author"]) == ("complement", "alice")


def test_undo_keeps_history_and_restores_the_current_label(fixture: ReviewFixture) -> None:
    store = fixture.store
    first = decide(store, fixture.uncertain_low, "alice", "irrelevant")
    second = decide(store, fixture.uncertain_mid, "alice", "exact")
    decide(store, fixture.mined, "bob", "exact")
    undone = undo_last(store, "alice")
    assert undone is not None and (undone.label_id, undone.label) == (second.label_id, "exact")
    current = store.current_labels("esci").set_index("pair_id")
    assert (current.loc[fixture.uncertain_mid, "source"], current.loc[fixture.uncertain_mid, "label"]) == ("llm", "complement")
    assert store.scalar("SELECT count(*) FROM labels WHERE label_id = ?", [second.label_id]) == 1  # history kept
    assert fixture.uncertain_mid in set(load_queue(store, "alice", settings=NO_OVERLAP)["pair_id"])
    assert undo_last(store, "alice").label_id == first.label_id
    assert undo_last(store, "alice") is None
    undo_decision(store, second.label_id, "alice")  # undoing twice adds nothing
    assert store.scalar("SELECT count(*) FROM review_events WHERE action = 'undo'") == 2
    bobs = store.scalar("SELECT label_id FROM labels WHERE author = 'bob'")
    with pytest.raises(MnrError, match="only your own decisions"):
        undo_decision(store, bobs, "alice")


def test_item_shows_llm_probabilities_engagement_and_earlier_humans(fixture: ReviewFixture) -> None:
    store = fixture.store
    pair = store.fetchall("SELECT query_id, product_id, dataset FROM pairs WHERE pair_id = ?", [fixture.disputed])[0]
    events = [("impression", 1), ("impression", 1), ("click", 1), ("add_to_cart", 1), ("impression", 2)]
    for index, (kind, position) in enumerate(events):
        store.execute(
            "INSERT INTO engagement_events (dataset, session_id, query_id, query_text, product_id, pair_id, position, "
            "event_type, ts, simulated, batch_id) VALUES (?, ?, ?, 'q', ?, ?, ?, ?, now(), true, 'b')",
            [pair[2], f"s{index}", pair[0], pair[1], fixture.disputed, position, kind],
        )
    item = load_item(store, fixture.disputed, "esci")
    assert item.llm_label["label"] == "irrelevant"
    assert item.llm_probs["irrelevant"] == pytest.approx(0.9)
    assert list(item.human_labels["author"]) == ["carol"]
    evidence = item.engagement
    assert (evidence.impressions, evidence.clicks, evidence.add_to_cart, evidence.simulated) == (3, 1, 1, True)
    # position CTRs: 1 click / 2 impressions at 1, 0 at 2 -> expected 0.5 + 0.5 + 0 = 1.0 clicks
    assert evidence.coec == pytest.approx(1.0)
    assert evidence.ctr == pytest.approx(1 / 3)


def test_agreement_on_a_hand_made_overlap_set(fixture: ReviewFixture) -> None:
    store = fixture.store
    pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id DESC LIMIT 5")]
    llm = ["exact", "substitute", "irrelevant", "irrelevant"]
    alice = ["exact", "exact", "irrelevant", "irrelevant"]
    store.add_labels([llm_label(pair, label, 0.9) for pair, label in zip(pairs, llm)])
    for pair, a_label, b_label in zip(pairs, alice, llm):
        decide(store, pair, "alice", a_label, source="overlap")
        decide(store, pair, "bob", b_label, source="overlap")
    decide(store, pairs[4], "alice", "complement")
    undo_last(store, "alice")  # an undone decision does not count
    decisions = decisions_frame(store, ESCI)
    versus_llm = annotator_vs_llm(decisions, ESCI).set_index("annotator")
    # by hand, quadratic weights (i-j)^2/9: observed disagreement 1/36, expected 4/9 -> kappa 1 - 1/16
    assert versus_llm.loc["alice", "kappa"] == pytest.approx(0.9375)
    assert versus_llm.loc["alice", "n"] == 4 and versus_llm.loc["alice", "accuracy"] == pytest.approx(0.75)
    assert versus_llm.loc["bob", "kappa"] == pytest.approx(1.0)
    between = between_annotators(decisions, ESCI)
    assert between[["annotator_a", "annotator_b", "n"]].values.tolist() == [["alice", "bob", 4]]
    assert between["kappa"].item() == pytest.approx(0.9375)
    matrix = confusion(decisions[decisions.annotator == "alice"]["label"],
                       decisions[decisions.annotator == "alice"]["llm_label"], ESCI)
    assert matrix.loc["exact", "exact"] == 1 and matrix.loc["exact", "substitute"] == 1
    assert matrix.loc["irrelevant", "irrelevant"] == 2 and int(matrix.values.sum()) == 4
    trend = kappa_trend(decisions, ESCI)
    assert trend.set_index("annotator").loc["alice", "kappa"] == pytest.approx(0.9375)
    assert (decisions["annotator"] == "alice").sum() == 4  # the undone fifth decision is gone


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from labelstore import LabelRecord, Store
    store = Store(sys.argv[1])
    pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id")]
    for batch in range(int(sys.argv[2])):
        store.add_labels([
            LabelRecord(pair_id=pair, scheme="esci", label="substitute", grade=2, source="llm",
                        author="llm:background", confidence=0.4, dedup_key=f"bg:{batch}:{pair}")
            for pair in pairs[:25]
        ])
        if batch == 0:
            Path(sys.argv[3]).write_text("started")
""")


def test_decisions_during_a_concurrent_batch_writer_are_all_kept(fixture: ReviewFixture, tmp_path: Path) -> None:
    store = fixture.store
    batches, started = 15, tmp_path / "started"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(store.path), str(batches), str(started)])
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the background writer never wrote its first batch"
        pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id DESC LIMIT 8")]
        results = [decide(store, pair, "alice", "exact", source="concurrency") for pair in pairs]
    finally:
        assert writer.wait(timeout=120) == 0
    kept = store.fetchall("SELECT pair_id, author FROM labels WHERE source = 'human' AND author = 'alice' ORDER BY pair_id")
    assert kept == sorted((pair, "alice") for pair in pairs)
    assert all(result.written for result in results)
    assert store.scalar("SELECT count(*) FROM labels WHERE author = 'llm:background'") == batches * 25
    assert store.scalar("SELECT count(*) FROM review_events WHERE action = 'decide'") == len(pairs)
