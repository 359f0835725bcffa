"""Policy flags in the review UI (AppTest, real store): the item's flags with the LLM's probability, set and
clear by button, written with the human label and its author; untouched flags keep the LLM's score; blind
overlap hides the probability; `[review] flag_priority` queues likely-flagged pairs first."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import app.review
from annotator.prompts import load_prompt_policy
from app.review.policy_flags import FLAG_KEYS, policy_of_author, toggle
from app.review.queue import load_queue
from app.review.settings import ADDRESS_ENV, ReviewSettings
from labelstore.errors import MnrError
from labelstore.flags import current_flags
from test_review_support import (
    ReviewFixture, build_review_store, copy_review_store, flagged_llm_label, write_config,
)

UI = Path(app.review.__file__).parent / "ui.py"
MARKETPLACE = load_prompt_policy("marketplace")
AUTHOR = flagged_llm_label("p", {}).author


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReviewFixture, str, str]:
    """The review fixture plus two confident marketplace LLM labels: one likely prohibited, one not."""
    fixture = build_review_store(tmp_path_factory.mktemp("review-flags-template") / "review.duckdb")
    likely, unlikely = [row[0] for row in fixture.store.fetchall(
        "SELECT pair_id FROM pairs ORDER BY pair_id LIMIT 2 OFFSET 7")]
    fixture.store.add_labels([flagged_llm_label(likely, {"prohibited": 0.92, "adult": 0.03}),
                              flagged_llm_label(unlikely, {"prohibited": 0.40, "adult": 0.10})])
    return fixture, likely, unlikely


@pytest.fixture
def flagged(template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ReviewFixture, str, str]:
    fixture, likely, unlikely = template
    copied = copy_review_store(fixture, tmp_path / "review.duckdb")
    monkeypatch.setenv("MNR_STORE", str(copied.store.path))
    monkeypatch.setenv(ADDRESS_ENV, "127.0.0.1")
    monkeypatch.setenv("MNR_CONFIG", str(write_config(tmp_path / "mnr.toml", overlap=0.0)))
    return copied, likely, unlikely


def open_pair(pair_id: str, name: str = "alice") -> AppTest:
    at = AppTest.from_file(str(UI), default_timeout=60).run()
    at.sidebar.text_input(key="mnr_identity").set_value(name).run()
    at.session_state["mnr_focus"] = (pair_id, "graded3", "flagged")
    del at.session_state["mnr_current"]
    at.run()
    assert not at.exception, at.exception
    assert at.session_state["mnr_current"]["shown"].pair_id == pair_id
    return at


def flag_lines(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith(("**prohibited**", "**adult**"))]


def test_set_and_clear_flags_are_written_with_the_label_and_its_author(flagged) -> None:
    fixture, likely, _ = flagged
    at = open_pair(likely)
    assert flag_lines(at) == ["**prohibited** · LLM: 92% · untouched", "**adult** · LLM: 3% · untouched"]
    assert any(f"policy marketplace:{MARKETPLACE.version}" in m.value for m in at.markdown)
    keys = next(c.value for c in at.caption if c.value.startswith("Keys:"))
    assert "F/G set a flag, Shift+F/G clear it" in keys
    at.button(key="mnr_flag_set_prohibited").click().run()
    at.button(key="mnr_flag_clear_adult").click().run()
    assert flag_lines(at) == ["**prohibited** · LLM: 92% · **set** by you", "**adult** · LLM: 3% · **cleared** by you"]
    at.button(key="mnr_label_partial").click().run()
    assert not at.exception, at.exception
    assert at.success[0].value.startswith("Saved 'partial' (adult cleared, prohibited set)")
    rows = fixture.store.fetchall(
        "SELECT l.label, l.author, f.flag, f.probability, f.decision FROM labels l JOIN label_flags f USING (label_id) "
        "WHERE l.source = 'human' AND l.pair_id = ? ORDER BY f.flag", [likely])
    assert rows == [("partial", "alice", "adult", 0.03, False), ("partial", "alice", "prohibited", 0.92, True)]
    flags = current_flags(fixture.store, [likely]).set_index("flag")
    assert flags["source"].tolist() == ["human", "human"]
    assert flags.loc["prohibited", "flagged"] and not flags.loc["adult", "flagged"]


def test_an_untouched_flag_is_no_decision_and_keeps_the_llm_score(flagged) -> None:
    fixture, likely, _ = flagged
    at = open_pair(likely)
    at.button(key="mnr_flag_clear_prohibited").click().run()
    at.button(key="mnr_flag_clear_prohibited").click().run()  # pressed again: untouched
    assert flag_lines(at)[0] == "**prohibited** · LLM: 92% · untouched"
    at.button(key="mnr_label_relevant").click().run()
    rows = fixture.store.fetchall(
        "SELECT f.flag, f.probability, f.decision FROM labels l JOIN label_flags f USING (label_id) "
        "WHERE l.source = 'human' AND l.pair_id = ? ORDER BY f.flag", [likely])
    assert rows == [("adult", 0.03, None), ("prohibited", 0.92, None)]
    flags = current_flags(fixture.store, [likely]).set_index("flag")
    # no decision: the flag's state is still the LLM label's, though the human label is now current
    assert flags.loc["prohibited", "flagged"] and flags.loc["prohibited", "source"] == "llm"


def test_the_standing_decision_shows_beside_a_newer_llm_score(flagged, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer LLM label does not undo a human decision (`current_flags`), and the page says so: the row shows
    the standing decision to whoever may see its author's decisions (not on a blind item, unless theirs)."""
    fixture, likely, _ = flagged
    at = open_pair(likely)
    at.button(key="mnr_flag_set_prohibited").click().run()
    at.button(key="mnr_label_partial").click().run()
    fixture.store.add_labels([flagged_llm_label(likely, {"prohibited": 0.10, "adult": 0.03})])
    assert current_flags(fixture.store, [likely]).set_index("flag").loc["prohibited", "flagged"]
    again = open_pair(likely)
    assert flag_lines(again) == ["**prohibited** · LLM: 10% · standing: set by alice · untouched",
                                 "**adult** · LLM: 3% · untouched"]
    # single-user mode: the reviewer is the store's admin and sees every decision
    assert flag_lines(open_pair(likely, "bob"))[0] == "**prohibited** · LLM: 10% · standing: set by alice · untouched"
    monkeypatch.setenv("MNR_CONFIG", str(write_config(tmp_path / "blind.toml", overlap=1.0)))
    assert flag_lines(open_pair(likely, "bob"))[0] == "**prohibited** · LLM: 10% · untouched"
    assert flag_lines(open_pair(likely))[0] == "**prohibited** · LLM: 10% · standing: set by alice · untouched"


def test_blind_overlap_with_blind_llm_hides_the_flag_probability(flagged, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, likely, _ = flagged
    monkeypatch.setenv("MNR_CONFIG", str(write_config(tmp_path / "blind.toml", overlap=1.0, blind_llm=True)))
    at = open_pair(likely)
    assert flag_lines(at) == ["**prohibited** · LLM: hidden until you decide · untouched",
                              "**adult** · LLM: hidden until you decide · untouched"]
    assert "92%" not in " ".join(m.value for m in at.markdown)
    at.button(key="mnr_flag_set_adult").click().run()
    assert flag_lines(at)[1].endswith("**set** by you")


def test_flag_priority_puts_likely_flagged_pairs_first(flagged) -> None:
    fixture, likely, unlikely = flagged
    plain = load_queue(fixture.store, "alice", settings=ReviewSettings(overlap=0.0))
    assert likely not in set(plain["pair_id"]) and "flagged" not in set(plain["source"])  # confident: not queued
    queue = load_queue(fixture.store, "alice", settings=ReviewSettings(overlap=0.0, flag_priority=0.5))
    first = queue.iloc[0]
    assert (first["pair_id"], first["source"], first["reason"]) == (likely, "flagged", "LLM flag prohibited 0.92")
    assert first["flag_probability"] == pytest.approx(0.92)
    assert unlikely not in set(queue["pair_id"])  # 0.40 < 0.5
    assert queue["pair_id"].tolist()[1:] == fixture.expected_order
    lower = load_queue(fixture.store, "alice", settings=ReviewSettings(overlap=0.0, flag_priority=0.3))
    assert lower["pair_id"].tolist()[:2] == [likely, unlikely]


def test_blind_llm_queues_a_flagged_blind_item_as_overlap(flagged) -> None:
    """Queued as flagged, first, with 'LLM flag prohibited 0.92', a blind item would tell the LLM's output."""
    fixture, likely, _ = flagged
    blind = load_queue(fixture.store, "alice", settings=ReviewSettings(overlap=1.0, flag_priority=0.5, blind_llm=True))
    row = blind.set_index("pair_id").loc[likely]
    assert (row["source"], row["tier"], row["blind"]) == ("overlap", 3, True)
    assert row["reason"] == "blind overlap: 0 of 2 annotators so far" and row["all_sources"] == "overlap"
    assert pd.isna(row["flag_probability"])
    assert not {"flagged", "uncertain"} & set(blind["source"]) and "0.92" not in " ".join(blind["reason"])
    seen = load_queue(fixture.store, "alice", settings=ReviewSettings(overlap=1.0, flag_priority=0.5))
    assert seen.iloc[0]["pair_id"] == likely  # blind to other humans only: the LLM's output shows
    assert seen.set_index("pair_id").loc[likely, "reason"] == "LLM flag prohibited 0.92"


def test_flag_priority_from_config_is_checked(tmp_path: Path) -> None:
    assert ReviewSettings.from_config({"review": {"flag_priority": 0.7}}).flag_priority == 0.7
    assert ReviewSettings.from_config({"review": {}}).flag_priority is None
    with pytest.raises(MnrError, match="review.flag_priority must be a number between 0 and 1"):
        ReviewSettings.from_config({"review": {"flag_priority": 2}})


def test_policy_of_author_and_toggle() -> None:
    from annotator.pair_form import policy_in_form
    from app.review.policy_flags import _versions_today

    # an adapter labels under its pair form's version: that is no "policy has changed"
    today = _versions_today("marketplace")
    assert {MARKETPLACE.version, policy_in_form(MARKETPLACE, "short").version} <= today
    assert policy_in_form(MARKETPLACE, "short", judged=True, match=True).version in today
    assert policy_in_form(MARKETPLACE, "short", judged=True, judged_counts="beyond_k").version in today
    assert len(today) == 7  # the policy, the short form without examples (2), with them (2 x 2 counts rules)
    assert policy_of_author(AUTHOR) == ("marketplace", MARKETPLACE.version)
    assert policy_of_author("smollm2+none+stack-1a2b@home-improvement:0123abcd") == ("home-improvement", "0123abcd")
    assert policy_of_author("llm:test") is None and policy_of_author(None) is None
    assert toggle({}, "adult", True) == {"adult": True}
    assert toggle({"adult": True}, "adult", False) == {"adult": False}
    assert toggle({"adult": True, "prohibited": False}, "adult", True) == {"prohibited": False}
    assert not {"C", "R", "S", "U"} & set(FLAG_KEYS)  # Streamlit's reserved keys and today's shortcuts
