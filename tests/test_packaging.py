"""A built wheel, installed apart from the source tree, gives a working `mnr` with its schemes and policies."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from annotator.prompts import list_policies, load_prompt_policy
from labelstore.schemes import list_schemes

REPO = Path(__file__).resolve().parents[1]
# Build outputs and local state that must not reach the build copy.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "site",
                                    "*.duckdb", "*.duckdb.wal", "demo-workspace", "results", ".pytest_cache",
                                    "models", "adapters", "reports")

PAIRS_CSV = """query,title,label,brand
cordless drill,DeWalt 20V MAX cordless drill,exact,DeWalt
cordless drill,Makita 18V cordless drill,substitute,Makita
cordless drill,Drill bit set of 20,complement,Bosch
garden hose,Kitchen sink faucet,irrelevant,Moen
garden hose,50 ft garden hose,exact,Flexzilla
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{command[:4]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout (pip builds in place), installed with --target."""
    root = tmp_path_factory.mktemp("packaging")
    source, wheels, target = root / "source", root / "wheels", root / "site"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("mine_refine-*.whl")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)])
    return target


def _outside_env(target: Path) -> dict[str, str]:
    """Only the install on the path: neither the checkout nor a prompts override is reachable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNR_")}
    return {**env, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_installed_package_finds_its_data_outside_the_repository(installed: Path, tmp_path: Path) -> None:
    probe = ("import labelstore, prompts; from labelstore.paths import prompts_dir;"
             "from labelstore.schemes import list_schemes; from annotator.prompts import list_policies;"
             "print(labelstore.__file__); print(prompts_dir()); print(list_schemes()); print(list_policies())")
    lines = _run([sys.executable, "-c", probe], cwd=tmp_path, env=_outside_env(installed)).stdout.splitlines()
    assert Path(lines[0]).is_relative_to(installed), "labelstore came from the install, not the checkout"
    assert Path(lines[1]) == installed / "prompts"
    # every scheme and policy of the checkout, and nothing else
    assert lines[2:] == [str(list_schemes()), str(list_policies())]
    for shipped in ("labelstore/sql/migrations/0001_init.sql", "auditor/templates/report.html.j2",
                    "auditor/sql/macros.sql", "app/review/sql/queue.sql", "app/review/screens/review.py",
                    "prompts/policies/_pair.j2"):
        assert (installed / shipped).is_file(), shipped


def test_installed_mnr_ingests_and_labels_with_the_tiny_model(installed: Path, tiny_llama: Path,
                                                              tmp_path: Path) -> None:
    (tmp_path / "pairs.csv").write_text(PAIRS_CSV, encoding="utf-8")
    (tmp_path / "queries.txt").write_text("cordless drill\ngarden hose\n", encoding="utf-8")
    mnr = [str(installed / "bin" / "mnr"), "--store", str(tmp_path / "mnr.duckdb")]
    env = _outside_env(installed)
    ingest = _run([*mnr, "ingest", "pairs.csv"], cwd=tmp_path, env=env)
    assert "5 pairs" in " ".join(ingest.stdout.split())
    label = _run([*mnr, "label", "--backend", "transformers", "--model", str(tiny_llama), "--policy",
                  "home-improvement", "--select", "query-file", "--query-file", "queries.txt"], cwd=tmp_path, env=env)
    out = " ".join(label.stdout.split())
    assert "5 labelled now" in out
    # The shipped policy is byte for byte the checkout's: same content hash in the label's author.
    assert f"@home-improvement:{load_prompt_policy('home-improvement').version}" in out
