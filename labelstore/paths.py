"""Where the project's data files live: the packaged prompts, the model cache, ../shared/data."""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def prompts_dir() -> Path:
    """The `prompts` package folder (schemes and policies); MNR_PROMPTS_DIR overrides it."""
    override = os.environ.get("MNR_PROMPTS_DIR")
    return Path(override) if override else package_dir("prompts")


def package_dir(package: str) -> Path:
    """The folder of an installed package's data files (a wheel installs them as plain files)."""
    root = files(package)
    if not isinstance(root, Path):
        # Readers rely on glob() and sibling paths, which a zip or namespace package cannot offer.
        raise RuntimeError(f"package {package!r} is not installed as a folder of files ({root!r})")
    return root


def cache_dir() -> Path:
    """Converted models and other derived artefacts; MNR_CACHE_DIR overrides ~/.cache/mine-refine."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mine-refine"
    path = Path(os.environ.get("MNR_CACHE_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """The shared relevance data (../shared/data beside the checkout), or None when absent."""
    candidates = [os.environ.get("MNR_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
