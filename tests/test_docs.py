"""The documentation site builds with `mkdocs build --strict`: every page in the nav, every link and anchor found."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    site = tmp_path / "site"
    assert "href=\"store/\"" in (site / "index.html").read_text(encoding="utf-8"), "the README is the home page"
    assert "bench.bench_retrieval" in (site / "results" / "index.html").read_text(encoding="utf-8")
    assert (site / "img" / "review.png").is_file() and (site / "img" / "auditor_report.png").is_file()


def test_readme_fits_on_two_screens() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; detail belongs in docs/"
