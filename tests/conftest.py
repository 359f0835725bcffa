"""Shared pytest fixtures. Area owners may add fixtures here; keep each one small."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + tokenizer folder (annotator.tiny.build_tiny_llama), built once per session."""
    from annotator.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


# -- skips are reported, and under CI only the shared-data ones are allowed -------------------------
def in_ci() -> bool:
    """True when the CI environment variable is set (and not 0/false/no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(condition: bool, reason: str) -> None:
    """Skip with `reason` when `condition` is false; under CI fail instead: there nothing may vanish."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI is set: this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


_SKIPS: list[tuple[str, str, bool]] = []  # (node id, reason, expected: a shared_data test)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _skip_reason(report), "shared_data" in report.keywords))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _SKIPS.append((report.nodeid, _skip_reason(report), False))


def _unexpected_skips() -> list[tuple[str, str, bool]]:
    return [skip for skip in _SKIPS if not skip[2]]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_ci() and _unexpected_skips() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line per skipped test with its reason; under CI any skip but a shared_data one fails the run."""
    if not _SKIPS:
        terminalreporter.write_line("skipped tests: none")
        return
    terminalreporter.section(f"skipped tests ({len(_SKIPS)})")
    for nodeid, reason, expected in _SKIPS:
        note = "expected without ../shared" if expected else ("NOT ALLOWED under CI" if in_ci() else "unexpected")
        terminalreporter.write_line(f"SKIPPED {nodeid}: {reason} [{note}]")
    unexpected = _unexpected_skips()
    if in_ci() and unexpected:
        terminalreporter.write_line(
            f"CI is set: {len(unexpected)} skip(s) other than shared_data; the run fails", red=True, bold=True)
