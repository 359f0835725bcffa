"""`mnr review`: loopback by default, the streamlit command line, config errors before launch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.commands_review import UI_SCRIPT, streamlit_command
from app.review.settings import is_loopback
from labelstore.accounts import add_account
from labelstore.store import Store


def test_only_loopback_addresses_count_as_local() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


def test_streamlit_command_serves_the_ui_headless_on_the_given_address() -> None:
    command = streamlit_command("127.0.0.1", 8765)
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(UI_SCRIPT)]
    options = dict(zip(command[5::2], command[6::2]))
    assert options["--server.address"] == "127.0.0.1" and options["--server.port"] == "8765"
    assert options["--server.headless"] == "true" and options["--browser.gatherUsageStats"] == "false"
    assert UI_SCRIPT.is_file()


def test_bad_review_config_fails_before_launch(tmp_path: Path) -> None:
    (tmp_path / "mnr.toml").write_text('[review]\noverlap = 2\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "app.cli", "--store", str(tmp_path / "s.duckdb"), "review"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "mnr.toml: review.overlap must be a number between 0 and 1, not 2" in result.stderr
    assert not (tmp_path / "s.duckdb").exists()


def review_beyond_loopback(tmp_path: Path, config: str = "") -> subprocess.CompletedProcess:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: past the checks, the bind fails.
    (tmp_path / "mnr.toml").write_text(config, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "review", "--store", str(tmp_path / "s.duckdb"),
         "--address", "192.0.2.1", "--port", "8999"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )


def test_binding_beyond_loopback_without_accounts_is_refused(tmp_path: Path) -> None:
    result = review_beyond_loopback(tmp_path)
    assert result.returncode == 2
    stderr = " ".join(result.stderr.split())
    assert "error: refusing to serve the review UI on 192.0.2.1: the store has no annotator accounts" in stderr
    assert "review UI for" not in result.stdout  # streamlit was never started
    assert (tmp_path / "s.duckdb").is_file()  # `mnr review --store PATH` opened (created) that store


def test_binding_beyond_loopback_with_accounts_or_a_trusted_header_starts(tmp_path: Path) -> None:
    add_account(Store(tmp_path / "s.duckdb"), "alice", "admin")
    result = review_beyond_loopback(tmp_path)
    assert "note: binding to 192.0.2.1: tokens travel in clear" in " ".join(result.stderr.split())
    assert "review UI for" in result.stdout
    result = review_beyond_loopback(tmp_path, '[review]\ntrusted_header = "X-Forwarded-User"\n')
    assert "identities come from the X-Forwarded-User header" in " ".join(result.stderr.split())
    assert "review UI for" in result.stdout
