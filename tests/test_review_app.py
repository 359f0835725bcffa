"""The review UI through Streamlit's AppTest, on a real store: identity, buttons, skip, undo, order, pages."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import app.review
from app.review.decisions import record_decision, record_skip, undo_last
from app.review.settings import ADDRESS_ENV, IdentityError
from labelstore.accounts import add_account, disable_account
from test_review_support import (
    ReviewFixture, build_review_store, copy_review_store, human_label, llm_label, write_config,
)

UI = Path(app.review.__file__).parent / "ui.py"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> ReviewFixture:
    return build_review_store(tmp_path_factory.mktemp("review-app-template") / "review.duckdb")


@pytest.fixture
def fixture(template: ReviewFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ReviewFixture:
    copied = copy_review_store(template, tmp_path / "review.duckdb")
    monkeypatch.setenv("MNR_STORE", str(copied.store.path))
    monkeypatch.setenv(ADDRESS_ENV, "127.0.0.1")  # what `mnr review` passes the UI on loopback
    monkeypatch.setenv("MNR_CONFIG", str(write_config(tmp_path / "mnr.toml", overlap=0.0, allow=["alice", "bob"])))
    return copied


def start(identity: str | None = "alice") -> AppTest:
    at = AppTest.from_file(str(UI), default_timeout=60).run()
    if identity is not None:
        at.sidebar.text_input(key="mnr_identity").set_value(identity).run()
    assert not at.exception, at.exception
    return at


def shown_pair(at: AppTest) -> str:
    return at.session_state["mnr_current"]["shown"].pair_id


def human_rows(fixture: ReviewFixture) -> list[tuple[str, str, str]]:
    return fixture.store.fetchall(
        "SELECT pair_id, label, author FROM labels WHERE source = 'human' AND author <> 'carol' ORDER BY label_id")


def test_identity_is_required_before_anything_is_written(fixture: ReviewFixture) -> None:
    at = start(identity=None)
    assert "no decision is written without one" in at.info[0].value
    assert not [button for button in at.button if button.key and button.key.startswith("mnr_label_")]
    at.sidebar.text_input(key="mnr_identity").set_value("mallory").run()
    assert "allow-list" in at.sidebar.error[0].value
    assert not [button for button in at.button if button.key and button.key.startswith("mnr_label_")]
    assert human_rows(fixture) == []
    at.sidebar.text_input(key="mnr_identity").set_value("bob").run()
    assert at.button(key="mnr_label_exact")


def all_review_rows(fixture: ReviewFixture) -> tuple[int, int]:
    return (fixture.store.scalar("SELECT count(*) FROM labels WHERE source = 'human' AND author <> 'carol'"),
            fixture.store.scalar("SELECT count(*) FROM review_events"))


@pytest.mark.parametrize("identity, error", [(None, "annotator id"), ("mallory", "allow-list")])
def test_a_write_attempted_without_an_accepted_identity_is_refused(fixture: ReviewFixture, identity: str | None,
                                                                   error: str) -> None:
    """The buttons are hidden without an identity; the handlers behind them (and their keyboard
    shortcuts) check it again: a click that reaches them with a missing or rejected one writes nothing."""
    at = start()
    before = all_review_rows(fixture)
    assert before == (0, 0)
    for key in ("mnr_label_exact", "mnr_skip", "mnr_undo"):
        at.session_state["mnr_annotator"] = identity  # what the handler sees, as if the sidebar check were bypassed
        at.button(key=key).click().run()
        assert not at.exception, at.exception
        assert any(error in message.value for message in at.error), (key, [m.value for m in at.error])
        assert all_review_rows(fixture) == before, key
    # the decisions layer the handlers call refuses too
    shown = at.session_state["mnr_current"]["shown"]
    with pytest.raises(IdentityError, match=error):
        record_decision(fixture.store, shown, identity, "exact", allow=("alice", "bob"))
    with pytest.raises(IdentityError, match=error):
        record_skip(fixture.store, shown, identity, allow=("alice", "bob"))
    with pytest.raises(IdentityError, match=error):
        undo_last(fixture.store, identity, allow=("alice", "bob"))
    assert all_review_rows(fixture) == before
    # the same click with the accepted identity writes
    at.button(key="mnr_label_exact").click().run()
    assert human_rows(fixture) == [(shown.pair_id, "exact", "alice")]


def test_label_by_button_follows_the_queue_order(fixture: ReviewFixture) -> None:
    at = start()
    order = fixture.expected_order
    assert shown_pair(at) == order[0]
    assert at.caption[0].value.startswith("Item 1 of 6 · queued as **audit**")
    for position, label in enumerate(["exact", "substitute", "irrelevant"]):
        assert shown_pair(at) == order[position]
        at.button(key=f"mnr_label_{label}").click().run()
        assert not at.exception, at.exception
        assert at.success[0].value.startswith(f"Saved '{label}'")
    assert shown_pair(at) == order[3]
    assert at.caption[0].value.startswith("Item 4 of 6 · queued as **uncertain**")
    assert human_rows(fixture) == [(order[0], "exact", "alice"), (order[1], "substitute", "alice"),
                                   (order[2], "irrelevant", "alice")]


def test_comment_is_saved_with_the_decision(fixture: ReviewFixture) -> None:
    at = start()
    decision_id = at.session_state["mnr_current"]["shown"].decision_id
    at.text_input(key=f"mnr_comment_{decision_id}").set_value("brand differs").run()
    at.button(key="mnr_label_substitute").click().run()
    assert fixture.store.fetchall("SELECT comment FROM labels WHERE author = 'alice'") == [("brand differs",)]


def test_skip_then_undo(fixture: ReviewFixture) -> None:
    at = start()
    first, second, third = fixture.expected_order[:3]
    at.button(key="mnr_skip").click().run()
    assert shown_pair(at) == second
    assert fixture.store.fetchall("SELECT action, pair_id, annotator FROM review_events") == [("skip", first, "alice")]
    at.button(key="mnr_label_complement").click().run()
    assert shown_pair(at) == third
    at.button(key="mnr_undo").click().run()
    assert not at.exception, at.exception
    assert at.success[0].value == "Undid your 'complement'; the pair is shown again."
    assert shown_pair(at) == second
    undone = fixture.store.fetchall(
        "SELECT l.pair_id, l.label FROM review_events e JOIN labels l USING (label_id) WHERE e.action = 'undo'")
    assert undone == [(second, "complement")]
    current = fixture.store.current_labels("esci").set_index("pair_id").loc[second]
    assert current["source"] == "import"  # back to what it was before the decision
    at.button(key="mnr_label_exact").click().run()
    assert human_rows(fixture) == [(second, "complement", "alice"), (second, "exact", "alice")]


def test_change_while_shown_is_saved_with_a_warning(fixture: ReviewFixture) -> None:
    at = start()
    fixture.store.add_labels([llm_label(shown_pair(at), "complement", 0.7, author="llm:batch")])
    at.button(key="mnr_label_exact").click().run()
    assert "changed while you were looking at it: llm label 'complement' by llm:batch" in at.warning[0].value
    assert human_rows(fixture) == [(fixture.expected_order[0], "exact", "alice")]


def test_agreement_page_shows_kappa_on_an_overlap_set(fixture: ReviewFixture) -> None:
    store = fixture.store
    pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id DESC LIMIT 4")]
    llm = ["exact", "substitute", "irrelevant", "irrelevant"]
    store.add_labels([llm_label(pair, label, 0.9) for pair, label in zip(pairs, llm)])
    alice = ["exact", "exact", "irrelevant", "irrelevant"]
    store.add_labels([human_label(pair, label, "alice") for pair, label in zip(pairs, alice)]
                     + [human_label(pair, label, "bob") for pair, label in zip(pairs, llm)])
    at = start()
    at.switch_page("screens/agreement.py").run()
    assert not at.exception, at.exception
    versus_llm = at.dataframe[0].value.set_index("annotator")
    assert versus_llm.loc["alice", "kappa"] == pytest.approx(0.9375)
    assert versus_llm.loc["bob", "kappa"] == pytest.approx(1.0)
    between = at.dataframe[1].value
    assert between[["annotator_a", "annotator_b", "n"]].values.tolist() == [["alice", "bob", 4]]
    assert between["kappa"].item() == pytest.approx(0.9375)


def test_audit_page_shows_the_report_and_links_flags_to_the_review_page(fixture: ReviewFixture) -> None:
    report = fixture.store.path.parent / "reports" / "audit-fixture" / "audit.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html><body><h1>Audit report</h1></body></html>", encoding="utf-8")
    at = start()
    at.switch_page("screens/audit.py").run()
    assert not at.exception, at.exception
    assert "audit-fixture" in at.markdown[0].value
    assert [expander.label for expander in at.expander] == [f"Report file: {report.resolve()}"]
    assert "<h1>Audit report</h1>" in at.expander[0].children[0].proto.srcdoc
    links = at.get("page_link")
    assert len(links) == 1 and links[0].proto.query_string == f"pair={fixture.audit_high}&scheme=esci"
    # following such a link opens that pair on the review page
    at = start()
    at.query_params["pair"] = fixture.mined
    at.run()
    assert shown_pair(at) == fixture.mined


def test_queue_page_counts_position_and_filters(fixture: ReviewFixture) -> None:
    at = start()
    at.button(key="mnr_label_exact").click().run()
    at.switch_page("screens/queue.py").run()
    assert not at.exception, at.exception
    assert "5 items waiting · decided in this session: 1 · current position: item 2 of 6" in at.markdown[0].value
    counts = {metric.label: metric.value for metric in at.metric}
    assert counts == {"audit": "1", "uncertain": "2", "disputed": "1", "overlap": "0", "mined": "1"}
    at.multiselect[0].set_value(["uncertain"])
    next(button for button in at.button if button.label == "Apply filters").click().run()
    assert "2 items waiting" in at.markdown[0].value
    at.switch_page("screens/review.py").run()
    assert shown_pair(at) == fixture.uncertain_low


def log_in_app(name: str, token: str) -> AppTest:
    at = AppTest.from_file(str(UI), default_timeout=60).run()
    at.sidebar.text_input(key="mnr_login_name").set_value(name)
    at.sidebar.text_input(key="mnr_login_token").set_value(token)
    at.sidebar.button[0].click().run()
    assert not at.exception, at.exception
    return at


def test_with_accounts_an_annotator_sees_only_her_own_labels_and_an_admin_all(fixture: ReviewFixture) -> None:
    store = fixture.store
    alice = add_account(store, "alice", "annotator")
    ann = add_account(store, "ann", "admin")
    at = AppTest.from_file(str(UI), default_timeout=60).run()
    assert "mnr_identity" not in [widget.key for widget in at.sidebar.text_input]  # a login, not a name field
    assert not [button for button in at.button if button.key and button.key.startswith("mnr_label_")]
    # the disputed pair (carol: exact, LLM: irrelevant) is not a blind item here (overlap 0)
    for name, token, sees_carol in (("alice", alice, False), ("ann", ann, True)):
        at = log_in_app(name, token)
        assert at.session_state["mnr_annotator"] == name
        at.session_state["mnr_focus"] = (fixture.disputed, "esci", "disputed")
        del at.session_state["mnr_current"]
        at.run()
        captions = " ".join(caption.value for caption in at.caption)
        tables = [frame.value for frame in at.dataframe]
        shown_authors = {author for table in tables if "author" in table for author in table["author"]}
        assert ("carol" in shown_authors) is sees_carol, name
        assert ("1 by others hidden: annotators see only their own" in captions) is not sees_carol, name
    at = log_in_app("alice", alice)
    assert "human said" not in " ".join(caption.value for caption in at.caption)
    at.switch_page("screens/queue.py").run()
    queue_table = at.dataframe[0].value
    assert "current_label" not in queue_table and "human said" not in " ".join(queue_table["reason"])


def test_an_account_disabled_mid_session_is_logged_out(fixture: ReviewFixture) -> None:
    alice = add_account(fixture.store, "alice", "annotator")
    at = log_in_app("alice", alice)
    assert at.button(key="mnr_label_exact")
    disable_account(fixture.store, "alice")
    at.run()
    assert "Your account was disabled" in at.sidebar.error[0].value
    assert not [button for button in at.button if button.key and button.key.startswith("mnr_label_")]


def test_run_without_mnr_review_and_without_accounts_is_refused(fixture, monkeypatch):
    """`streamlit run ui.py` with no address listens on every interface: single-user mode is refused."""
    monkeypatch.delenv(ADDRESS_ENV)
    at = AppTest.from_file(str(UI), default_timeout=60).run()
    assert any("beyond loopback" in error.value for error in at.error)
    assert not [button for button in at.button if button.label.lower().startswith("exact")]
