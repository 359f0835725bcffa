"""End to end: `mnr review` on a temporary store, driven by a real Chromium (Debian's, no download)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import require
from test_review_support import build_review_store, write_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
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


def wait_until_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until the app has no script run in progress (Streamlit's running indicator is gone)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidgetRunningIcon"]').wait_for(state="detached", timeout=timeout_ms)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mnr review exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"mnr review did not answer at {url} within {timeout}s")


@pytest.fixture
def review_server(tmp_path: Path):
    sync_api = browser_api()
    fixture = build_review_store(tmp_path / "review.duckdb")
    port = free_port()
    env = dict(os.environ, MNR_CONFIG=str(write_config(tmp_path / "mnr.toml", overlap=0.0)))
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "review", "--store", str(fixture.store.path), "--port", str(port)],
        env=env, cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        yield fixture, url, sync_api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_review_three_items_in_chromium(review_server, tmp_path: Path) -> None:
    fixture, url, sync_api = review_server
    order = fixture.expected_order
    screenshot = Path(os.environ.get("MNR_REVIEW_SCREENSHOT", tmp_path / "review.png"))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(url)
            identity = page.get_by_label("Your name or annotator id", exact=True)
            identity.fill("alice")
            identity.press("Enter")
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
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print((tmp_path / "server.log").read_text(), f"failure screenshot: {tmp_path / 'failure.png'}")
            raise
        finally:
            browser.close()
    rows = fixture.store.fetchall(
        "SELECT pair_id, label, author, source FROM labels WHERE author = 'alice' ORDER BY label_id")
    assert rows == [(order[0], "exact", "alice", "human"), (order[1], "substitute", "alice", "human"),
                    (order[2], "irrelevant", "alice", "human")]
    assert screenshot.stat().st_size > 10_000
