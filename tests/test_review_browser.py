"""End to end: `mnr review` on a temporary store, driven by a real Chromium (Debian's, no download):
single-user review by keyboard and mouse, policy flags by keyboard, login with tokens, blind overlap,
trusted-header sign-in."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from bench.review_browser import CHROMIUM, CHROMIUM_ARGS, log_in, serve_review, wait_until_idle
from conftest import require
from labelstore.accounts import add_account, disable_account
from test_review_support import ReviewFixture, build_review_store, flagged_llm_label, human_label, write_config

pytestmark = [pytest.mark.browser]


def browser_api():
    """Playwright's sync API, with Chromium present; a skip without them, a failure under CI."""
    require(CHROMIUM.exists(), "needs /usr/bin/chromium (scripts/install-browser.sh)")
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        sync_api = None
    require(sync_api is not None, "needs playwright (pip install playwright)")
    return sync_api


@pytest.fixture
def fixture(tmp_path: Path) -> ReviewFixture:
    return build_review_store(tmp_path / "review.duckdb")


@pytest.fixture
def browser(fixture: ReviewFixture, tmp_path: Path):
    """A headless Chromium; on a failure its pages are screenshot and the server log printed."""
    sync_api = browser_api()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        except Exception:
            for number, page in enumerate(page for context in chromium.contexts for page in context.pages):
                page.screenshot(path=str(tmp_path / f"failure-{number}.png"), full_page=True)
            log = tmp_path / "server.log"
            print(log.read_text() if log.exists() else "", f"failure screenshots in {tmp_path}")
            raise
        finally:
            chromium.close()


@pytest.fixture
def start_review(fixture: ReviewFixture, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """`start_review(**review)`: `mnr review` on the fixture store with these `[review]` settings; its URL."""
    browser_api()
    with ExitStack() as servers:
        def start(**review: object) -> str:
            config = write_config(tmp_path / "mnr.toml", **review)
            return servers.enter_context(serve_review(fixture.store.path, config, tmp_path / "server.log"))
        yield start


def decision_buttons(page) -> int:
    return page.locator('[class*="st-key-mnr_label_"] button').count()


def open_single_user(browser, url: str, name: str = "alice"):
    """A page on `url` with `name` entered as the single-user identity."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    identity = page.get_by_label("Your name or annotator id", exact=True)
    identity.fill(name)
    identity.press("Enter")
    return page


def press_on_page(page, key: str) -> None:
    """Press a shortcut with the page focused, not a text field."""
    wait_until_idle(page)
    page.locator("h3").first.click()
    page.keyboard.press(key)


def test_review_three_items_in_chromium(fixture: ReviewFixture, start_review, browser, tmp_path: Path) -> None:
    url = start_review(overlap=0.0)
    order = fixture.expected_order
    screenshot = Path(os.environ.get("MNR_REVIEW_SCREENSHOT", tmp_path / "review.png"))
    page = open_single_user(browser, url)
    page.get_by_text("Item 1 of 6").wait_for(timeout=90_000)
    page.locator(".st-key-mnr_label_exact button").first.click()
    page.get_by_text("Item 2 of 6").wait_for(timeout=60_000)
    page.locator(".st-key-mnr_label_substitute button").first.click()
    page.get_by_text("Item 3 of 6").wait_for(timeout=60_000)
    wait_until_idle(page)
    page.locator("h3").first.click()  # focus the page, not a text field
    page.keyboard.press("4")  # the shortcut of the fourth label: irrelevant
    page.get_by_text("Item 4 of 6").wait_for(timeout=60_000)
    page.get_by_text("Engagement (simulated)").wait_for(timeout=60_000)
    wait_until_idle(page)
    page.get_by_label("Comment (optional)", exact=True).click()
    page.keyboard.type("1 or 2")  # digits typed into a text field are text, not shortcuts
    wait_until_idle(page)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    rows = fixture.store.fetchall(
        "SELECT pair_id, label, author, source FROM labels WHERE author = 'alice' ORDER BY label_id")
    assert rows == [(order[0], "exact", "alice", "human"), (order[1], "substitute", "alice", "human"),
                    (order[2], "irrelevant", "alice", "human")]
    assert screenshot.stat().st_size > 10_000


def test_policy_flags_by_keyboard_in_chromium(fixture: ReviewFixture, start_review, browser) -> None:
    """With flag_priority, a likely-prohibited pair comes first; F sets its first flag, Shift+G clears the
    second, and the label key saves both with the label."""
    store = fixture.store
    likely = store.scalar("SELECT pair_id FROM pairs ORDER BY pair_id LIMIT 1 OFFSET 7")
    store.add_labels([flagged_llm_label(likely, {"prohibited": 0.92, "adult": 0.03})])
    page = open_single_user(browser, start_review(overlap=0.0, flag_priority=0.5))
    page.get_by_text("queued as flagged: LLM flag prohibited 0.92").wait_for(timeout=90_000)
    press_on_page(page, "f")
    page.get_by_text("prohibited · LLM: 92% · set by you").wait_for(timeout=60_000)
    press_on_page(page, "Shift+G")
    page.get_by_text("adult · LLM: 3% · cleared by you").wait_for(timeout=60_000)
    wait_until_idle(page)
    assert page.get_by_text("prohibited · LLM: 92% · set by you").count() == 1  # F fired once, Shift+G not as G
    press_on_page(page, "2")  # graded3: partial
    page.get_by_text("Saved 'partial' (adult cleared, prohibited set)").wait_for(timeout=60_000)
    assert store.fetchall(
        "SELECT l.label, l.author, f.flag, f.decision FROM labels l JOIN label_flags f USING (label_id) "
        "WHERE l.source = 'human' ORDER BY f.flag") == [("partial", "alice", "adult", False),
                                                       ("partial", "alice", "prohibited", True)]


def test_login_roles_and_blind_overlap_in_chromium(fixture: ReviewFixture, start_review, browser) -> None:
    """Wrong and disabled tokens are refused; an annotator sees neither carol's label nor the LLM's on a
    blind overlap item, nor the agreement page; her decision is written under her id."""
    store = fixture.store
    alice = add_account(store, "alice", "annotator")
    mallory = add_account(store, "mallory", "annotator")
    disable_account(store, "mallory")
    url = start_review(overlap=1.0, overlap_k=2, blind_llm=True)
    # carol labelled the disputed pair 'exact' with a comment; the LLM said 'irrelevant' (90%)
    store.execute("UPDATE labels SET comment = 'carol was here' WHERE author = 'carol'")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/?pair={fixture.disputed}&scheme=esci")
    log_in(page, "alice", alice + "x")
    page.get_by_text("name or token not accepted").wait_for(timeout=90_000)
    log_in(page, "mallory", mallory)
    page.get_by_text("account 'mallory' is disabled").wait_for(timeout=60_000)
    assert decision_buttons(page) == 0
    log_in(page, "alice", alice)
    page.get_by_text("Logged in as alice (annotator)").wait_for(timeout=60_000)
    page.get_by_text("1 by others hidden: a blind overlap item").wait_for(timeout=60_000)
    wait_until_idle(page)
    text = page.locator("body").inner_text()
    assert "hidden until you decide" in text
    assert "carol" not in text and "llm:test" not in text and "90%" not in text
    assert page.get_by_role("link", name="Agreement").count() == 0  # annotators get no agreement page
    assert page.get_by_role("link", name="Queue").count() == 1
    page.locator("h3").first.click()
    page.keyboard.press("2")  # substitute
    page.get_by_text("Saved 'substitute'").wait_for(timeout=60_000)
    assert store.fetchall("SELECT label, author FROM labels WHERE pair_id = ? AND source = 'human' "
                          "ORDER BY label_id", [fixture.disputed]) == [("exact", "carol"), ("substitute", "alice")]
    logins = store.fetchall("SELECT action, account, detail FROM account_events WHERE action LIKE 'login%' "
                            "ORDER BY event_id")
    assert logins == [("login_failed", "alice", "wrong token"), ("login_failed", "mallory", "account disabled"),
                      ("login", "alice", None)]


def test_admin_adjudicates_in_chromium(fixture: ReviewFixture, start_review, browser) -> None:
    store = fixture.store
    ann = add_account(store, "ann", "admin")
    add_account(store, "bob", "annotator")
    store.add_labels([human_label(fixture.disputed, "substitute", "bob")])  # carol said exact
    url = start_review(overlap=0.0)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    log_in(page, "ann", ann)
    # a click on the navigation while the login's rerun is still running can be lost under load
    page.get_by_text("Logged in as ann (admin)").wait_for(timeout=90_000)
    wait_until_idle(page)
    page.get_by_role("link", name="Adjudicate").click()
    page.get_by_text("Disagreements waiting (1)").wait_for(timeout=90_000)
    page.get_by_text("bob=substitute; carol=exact").first.wait_for(timeout=60_000)
    page.get_by_text("complement", exact=True).click()
    page.get_by_role("button", name="Adjudicate").click()
    page.get_by_text("Adjudicated 'complement'").wait_for(timeout=60_000)
    current = store.current_labels("esci").set_index("pair_id").loc[fixture.disputed]
    assert (current["label"], current["author"]) == ("complement", "ann")
    assert store.fetchall("SELECT admin, label, decisions FROM adjudications") == [
        ("ann", "complement", "bob=substitute; carol=exact")]


def test_trusted_header_mode_in_chromium(fixture: ReviewFixture, start_review, browser) -> None:
    url = start_review(overlap=0.0, trusted_header="X-Forwarded-User")
    anonymous = browser.new_page()
    anonymous.goto(url)
    anonymous.get_by_text("Refused: the request carries no X-Forwarded-User header").wait_for(timeout=90_000)
    assert decision_buttons(anonymous) == 0
    context = browser.new_context(extra_http_headers={"X-Forwarded-User": "dana"},
                                  viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.get_by_text("Signed in as dana (annotator) by X-Forwarded-User").wait_for(timeout=60_000)
    page.get_by_text("Item 1 of 6").wait_for(timeout=60_000)
    wait_until_idle(page)
    page.locator("h3").first.click()
    page.keyboard.press("1")  # exact
    page.get_by_text("Item 2 of 6").wait_for(timeout=60_000)
    assert fixture.store.fetchall("SELECT pair_id, label, author FROM labels WHERE author = 'dana'") == [
        (fixture.expected_order[0], "exact", "dana")]
    # one login per browser session (a reconnect under load is a new session, and logs again)
    assert set(fixture.store.fetchall("SELECT action, account, method FROM account_events")) == {
        ("login", "dana", "header")}
