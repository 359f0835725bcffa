"""`mnr.toml`: optional project configuration, read from the working folder (or MNR_CONFIG).

Sections are owned by the parts that read them: [store], [annotator], [auditor], [trigger],
[review], [trainer], [loop]. Command-line flags override the file; the file overrides defaults.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from labelstore.errors import MnrError

DEFAULT_STORE = "mnr.duckdb"


def config_path() -> Path:
    return Path(os.environ.get("MNR_CONFIG", "mnr.toml"))


def read_toml(path: Path, error: type[MnrError] = MnrError) -> dict[str, Any]:
    """Parse a TOML file; a syntax error becomes `error` naming the file and the position."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from exc


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The parsed config, or {} when the file does not exist."""
    path = Path(path) if path is not None else config_path()
    if not path.is_file():
        return {}
    return read_toml(path)


def section(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    config = load_config() if config is None else config
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise MnrError(f"{config_path()}: [{name}] must be a table")
    return value


def store_path(cli_value: str | None = None) -> str:
    """--store flag > MNR_STORE > [store] path in mnr.toml > ./mnr.duckdb."""
    if cli_value:
        return cli_value
    if os.environ.get("MNR_STORE"):
        return os.environ["MNR_STORE"]
    return str(section("store").get("path", DEFAULT_STORE))
