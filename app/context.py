"""Shared CLI state: the store path chosen by --store / MNR_STORE / mnr.toml, and console output."""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from labelstore import Store
from labelstore.config import store_path

console = Console()
err_console = Console(stderr=True)


@dataclass
class CliState:
    store: str | None = None


state = CliState()


def get_store_path() -> str:
    return store_path(state.store)


def open_store() -> Store:
    return Store(get_store_path())
