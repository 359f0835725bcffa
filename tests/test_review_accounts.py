"""Review accounts on a real store: tokens, roles, writes checked against accounts, blind overlap,
adjudication, agreement against the consensus, and the audit trail in `mnr export --history`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.review.agreement import consensus, decisions_frame, versus_consensus
from app.review.decisions import adjudicate, record_decision, record_skip, show, undo_last
from app.review.item import load_item
from app.review.queue import is_blind, load_queue
from app.review.settings import ReviewSettings
from labelstore import Store
from labelstore.accounts import (
    MAX_FAILURES, AuthError, add_account, admit_header, authenticate, disable_account, has_accounts, list_accounts, reset_token,
)
from labelstore.errors import MnrError
from labelstore.export import events_path, export_labels
from labelstore.schemes import load_scheme
from labelstore.sqlfiles import sql
from test_review_support import ReviewFixture, fixture, llm_label, template  # noqa: F401  (fixtures)

ESCI = load_scheme("esci")


def decide(store: Store, pair_id: str, annotator: str, label: str, source: str = "test"):
    return record_decision(store, show(load_item(store, pair_id, "esci"), source), annotator, label)


def account_events(store: Store) -> list[tuple[str, str, str | None]]:
    return store.fetchall("SELECT action, account, detail FROM account_events ORDER BY event_id")


def test_tokens_are_stored_hashed_and_checked(fixture: ReviewFixture) -> None:
    store = fixture.store
    assert not has_accounts(store)
    token = add_account(store, "alice", "admin")
    assert has_accounts(store) and len(token) >= 32
    stored = store.scalar("SELECT token_hash FROM accounts WHERE name = 'alice'")
    assert token not in stored and stored.startswith("scrypt$")
    assert authenticate(store, "alice", token).is_admin
    with pytest.raises(AuthError, match="name or token not accepted"):
        authenticate(store, "alice", token[:-1] + ("x" if token[-1] != "x" else "y"))
    with pytest.raises(AuthError, match="name or token not accepted"):
        authenticate(store, "nobody", token)
    with pytest.raises(MnrError, match="exists already"):
        add_account(store, "alice", "annotator")
    with pytest.raises(MnrError, match="role must be one of"):
        add_account(store, "bob", "owner")
    new = reset_token(store, "alice")
    with pytest.raises(AuthError):
        authenticate(store, "alice", token)  # the old token stopped working
    assert authenticate(store, "alice", new).name == "alice"
    disable_account(store, "alice")
    with pytest.raises(AuthError, match="account 'alice' is disabled"):
        authenticate(store, "alice", new)
    assert has_accounts(store)  # a disabled account still means accounts mode: no fallback to single-user
    assert account_events(store) == [
        ("add", "alice", "role admin"), ("login", "alice", None), ("login_failed", "alice", "wrong token"),
        ("login_failed", "nobody", "unknown account"), ("reset_token", "alice", None),
        ("login_failed", "alice", "wrong token"), ("login", "alice", None), ("disable", "alice", None),
        ("login_failed", "alice", "account disabled"),
    ]
    listed = list_accounts(store).set_index("name")
    assert listed.loc["alice", "disabled"] and listed.loc["alice", "failed_logins"] == 3


def test_repeated_failures_lock_the_name_out(fixture: ReviewFixture) -> None:
    store = fixture.store
    token = add_account(store, "alice", "annotator")
    for _ in range(MAX_FAILURES):
        with pytest.raises(AuthError, match="name or token not accepted"):
            authenticate(store, "alice", "guess")
    with pytest.raises(AuthError, match="too many failed logins for 'alice'"):
        authenticate(store, "alice", token)  # even the right token, until the window has passed
    store.execute("UPDATE account_events SET created_at = created_at - INTERVAL 16 MINUTE")
    assert authenticate(store, "alice", token).name == "alice"


def test_trusted_header_identity(fixture: ReviewFixture) -> None:
    store = fixture.store
    assert admit_header(store, "dana", "X-Forwarded-User").role == "annotator"  # no account: an annotator
    add_account(store, "erin", "admin")
    assert admit_header(store, "erin", "X-Forwarded-User").is_admin  # an account gives its role
    disable_account(store, "erin")
    with pytest.raises(AuthError, match="disabled"):
        admit_header(store, "erin", "X-Forwarded-User")
    with pytest.raises(AuthError, match="no valid annotator id"):
        admit_header(store, "a b;drop", "X-Forwarded-User")
    assert [row[:2] for row in account_events(store) if row[0].startswith("login")] == [
        ("login", "dana"), ("login", "erin"), ("login_failed", "erin"), ("login_failed", "a b;drop")]
    # dana has no account: her writes count only as vouched for by the proxy, erin's not at all
    shown = show(load_item(store, fixture.audit_high, "esci"), "audit")
    with pytest.raises(AuthError, match="'dana' is not an enabled account"):
        record_decision(store, shown, "dana", "exact")
    with pytest.raises(AuthError, match="'erin' is not an enabled account"):
        record_decision(store, shown, "erin", "exact", vouched=True)
    assert record_decision(store, shown, "dana", "exact", vouched=True).written


def test_with_accounts_only_enabled_accounts_write(fixture: ReviewFixture) -> None:
    store = fixture.store
    add_account(store, "alice", "annotator")
    shown = show(load_item(store, fixture.audit_high, "esci"), "audit")
    with pytest.raises(AuthError, match="'mallory' is not an enabled account"):
        record_decision(store, shown, "mallory", "exact")
    with pytest.raises(AuthError):
        record_skip(store, shown, "mallory")
    assert record_decision(store, shown, "alice", "exact").written
    disable_account(store, "alice")  # disabled mid-session: the next write is refused
    with pytest.raises(AuthError, match="'alice' is not an enabled account"):
        undo_last(store, "alice")
    assert store.fetchall("SELECT author FROM labels WHERE source = 'human' AND author <> 'carol'") == [("alice",)]
    disable_account(store, "alice", disabled=False)
    assert undo_last(store, "alice").pair_id == fixture.audit_high
    assert store.fetchall("SELECT annotator, action FROM review_events ORDER BY created_at") == [
        ("alice", "decide"), ("alice", "undo")]


def test_blind_overlap_goes_to_k_annotators_and_hides_labels(fixture: ReviewFixture) -> None:
    store = fixture.store
    settings = ReviewSettings(overlap=1.0, overlap_k=3)
    assert is_blind(store, fixture.disputed, "esci", settings)
    assert not is_blind(store, fixture.disputed, "esci", ReviewSettings(overlap=0.0))
    # carol decided the disputed pair; with everything blind it waits for two more annotators, as overlap,
    # and neither its reason nor the queue tells her label
    alice = load_queue(store, "alice", settings=settings).set_index("pair_id")
    row = alice.loc[fixture.disputed]
    assert (row["source"], row["reason"]) == ("overlap", "blind overlap: 1 of 3 annotators so far")
    assert pd.isna(row["current_label"]) and pd.isna(row["current_source"]) and row["blind"]
    decide(store, fixture.disputed, "alice", "substitute", "overlap")
    assert fixture.disputed in set(load_queue(store, "bob", settings=settings)["pair_id"])
    decide(store, fixture.disputed, "bob", "substitute", "overlap")
    assert fixture.disputed not in set(load_queue(store, "dave", settings=settings)["pair_id"])  # k reached
    # without overlap the same pair is a plain dispute that shows the labels
    plain = load_queue(store, "erin", settings=ReviewSettings(overlap=0.0)).set_index("pair_id")
    assert fixture.disputed not in plain.index or not plain.loc[fixture.disputed, "blind"]


def test_adjudication_by_an_admin_sets_the_label(fixture: ReviewFixture) -> None:
    store = fixture.store
    add_account(store, "ann", "admin")
    add_account(store, "alice", "annotator")
    add_account(store, "bob", "annotator")
    pair = fixture.confident  # the LLM said exact
    decide(store, pair, "alice", "exact", "overlap")
    with pytest.raises(MnrError, match="fewer than two annotators"):
        adjudicate(store, pair, "esci", "ann", "exact")
    decide(store, pair, "bob", "substitute", "overlap")
    disputes = store.df(sql("app.review", "disagreements"), {"scheme": "esci"})
    assert disputes.set_index("pair_id").loc[pair, "decisions"] == "alice=exact; bob=substitute"
    with pytest.raises(AuthError, match="'alice' is not an admin"):
        adjudicate(store, pair, "esci", "alice", "exact")
    result = adjudicate(store, pair, "esci", "ann", "substitute", comment="a substitute, per policy 2.1")
    assert result.decisions == "alice=exact; bob=substitute"
    current = store.current_labels("esci").set_index("pair_id").loc[pair]
    assert (current["label"], current["author"], current["source"]) == ("substitute", "ann", "human")
    assert pair not in set(store.df(sql("app.review", "disagreements"), {"scheme": "esci"})["pair_id"])
    # the adjudication is not a third annotator's decision, and it is the consensus
    decisions = decisions_frame(store, ESCI, overlap=1.0)
    assert sorted(decisions[decisions.pair_id == pair]["annotator"]) == ["alice", "bob"]
    assert consensus(decisions).set_index("pair_id").loc[pair, "consensus"] == "substitute"


def test_kappa_against_the_consensus_on_blind_items(fixture: ReviewFixture) -> None:
    store = fixture.store
    pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id DESC LIMIT 5")]
    store.add_labels([llm_label(pair, label, 0.9) for pair, label in
                      zip(pairs, ["exact", "substitute", "irrelevant", "irrelevant"])])
    votes = {"alice": ["exact", "exact", "irrelevant", "irrelevant", "exact"],
             "bob": ["exact", "substitute", "irrelevant", "irrelevant", "complement"],
             "cy": ["exact", "substitute", "irrelevant", "complement"]}
    for annotator, labels in votes.items():
        for pair, label in zip(pairs, labels):
            decide(store, pair, annotator, label, "overlap")
    decisions = decisions_frame(store, ESCI, overlap=1.0)
    agreed = consensus(decisions).set_index("pair_id")["consensus"]
    # majority per pair; the fifth (alice exact, bob complement) is a tie: no consensus
    assert agreed.to_dict() == dict(zip(pairs[:4], ["exact", "substitute", "irrelevant", "irrelevant"]))
    scores = versus_consensus(decisions, ESCI).set_index("who")
    assert scores.loc["bob", "kappa"] == pytest.approx(1.0) and scores.loc["bob", "n"] == 4
    # alice: one near miss (exact for substitute), as in test_review_logic: 1 - 1/16
    assert scores.loc["alice", "kappa"] == pytest.approx(0.9375)
    assert scores.loc["cy", "accuracy"] == pytest.approx(0.75)
    assert scores.loc["LLM", "kappa"] == pytest.approx(1.0) and scores.loc["LLM", "n"] == 4
    # items outside the blind share are not used
    assert consensus(decisions_frame(store, ESCI, overlap=0.0)).empty


def test_history_export_has_the_audit_trail(fixture: ReviewFixture, tmp_path: Path) -> None:
    store = fixture.store
    token = add_account(store, "ann", "admin")
    add_account(store, "alice", "annotator")
    add_account(store, "bob", "annotator")
    with pytest.raises(AuthError):
        authenticate(store, "ann", "wrong")
    authenticate(store, "ann", token)
    decide(store, fixture.confident, "alice", "exact")
    decide(store, fixture.confident, "bob", "irrelevant")
    undo_last(store, "bob")
    decide(store, fixture.confident, "bob", "complement")
    adjudicate(store, fixture.confident, "esci", "ann", "exact")
    out = tmp_path / "history.jsonl"
    export_labels(store, out, history=True)
    events = pd.read_json(events_path(out), lines=True)
    trail = [tuple(row) for row in events[["kind", "action", "actor", "label"]].itertuples(index=False)]
    trail = [tuple(None if pd.isna(value) else value for value in row) for row in trail]
    assert trail == [
        ("account", "add", "ann", None), ("account", "add", "alice", None), ("account", "add", "bob", None),
        ("account", "login_failed", "ann", None), ("account", "login", "ann", None),
        ("review", "decide", "alice", "exact"), ("review", "decide", "bob", "irrelevant"),
        ("review", "undo", "bob", "irrelevant"), ("review", "decide", "bob", "complement"),
        ("adjudication", "adjudicate", "ann", "exact"),
    ]


def test_annotators_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    store = str(tmp_path / "s.duckdb")
    added = runner.invoke(cli_app, ["annotators", "add", "alice", "--role", "admin", "--store", store])
    assert added.exit_code == 0, added.output
    token = added.output.strip().splitlines()[-1]
    assert authenticate(Store(store), "alice", token).is_admin
    assert runner.invoke(cli_app, ["annotators", "add", "bob", "--store", store]).exit_code == 0
    assert runner.invoke(cli_app, ["annotators", "disable", "bob", "--store", store]).exit_code == 0
    listed = runner.invoke(cli_app, ["annotators", "list", "--store", store])
    assert listed.exit_code == 0
    lines = {line.split()[1]: line for line in listed.output.splitlines() if line.startswith("│ ")}
    assert "admin" in lines["alice"] and "annotator" in lines["bob"] and "yes" in lines["bob"]
    reset = runner.invoke(cli_app, ["annotators", "reset-token", "alice", "--store", store])
    assert authenticate(Store(store), "alice", reset.output.strip().splitlines()[-1]).name == "alice"
    refused = runner.invoke(cli_app, ["annotators", "add", "b b", "--store", store])
    assert refused.exit_code != 0 and "is not valid" in str(refused.exception)
