"""Serve `mnr review` in the background and drive it in Debian's Chromium (no playwright download).

Shared by the browser tests (tests/test_review_browser.py) and bench_review.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


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


def wait_until_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until the app has no script run in progress (Streamlit's running indicator is gone)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidgetRunningIcon"]').wait_for(state="detached", timeout=timeout_ms)


@contextmanager
def serve_review(store_path: Path, config_path: Path, log_path: Path) -> Iterator[str]:
    """`mnr review` on `store_path` with `config_path` as mnr.toml, on a free loopback port; yields its URL.

    The server's output goes to `log_path`; the whole process group is stopped on exit.
    """
    port = free_port()
    env = dict(os.environ, MNR_CONFIG=str(config_path))
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "review", "--store", str(store_path), "--port", str(port)],
            env=env, cwd=log_path.parent, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, server)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def log_in(page, name: str, token: str) -> None:
    """Fill the sidebar's login form and submit it."""
    page.get_by_label("Annotator name", exact=True).fill(name)
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_role("button", name="Log in").click()
