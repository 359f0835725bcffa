"""Shared CLI state: the store path chosen by --store / MNR_STORE / mnr.toml, --verbose, console output."""
from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from labelstore import Store
from labelstore.config import store_path

console = Console()
err_console = Console(stderr=True)


STORE_HELP = "Store file (default: MNR_STORE, else store.path in mnr.toml, else ./mnr.duckdb)."


@dataclass
class CliState:
    store: str | None = None
    verbose: bool = False


state = CliState()


def get_store_path() -> str:
    return store_path(state.store)


def open_store() -> Store:
    return Store(get_store_path())


def with_store_option(callback: Callable[..., Any]) -> Callable[..., Any]:
    """`callback` with a `--store` option of its own that wins over the global `mnr --store`.

    Typer reads a command's options from its signature, so the wrapper's signature is the callback's
    plus one keyword-only parameter; the callbacks themselves stay unchanged.
    """
    signature = inspect.signature(callback, eval_str=True)

    @functools.wraps(callback)
    def wrapper(*args: Any, mnr_store: Optional[str] = None, **kwargs: Any) -> Any:
        if mnr_store is not None:
            state.store = mnr_store
        return callback(*args, **kwargs)

    option = inspect.Parameter("mnr_store", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                               default=typer.Option(None, "--store", help=STORE_HELP))
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), option])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**callback.__annotations__, "mnr_store": Optional[str]}
    return wrapper


def add_store_option(app: typer.Typer) -> None:
    """Give every command of `app` and of its sub-apps a `--store` option (see `with_store_option`)."""
    for command in app.registered_commands:
        command.callback = with_store_option(command.callback)
    for group in app.registered_groups:
        add_store_option(group.typer_instance)


@contextmanager
def chatter_to_log(log_path: Path, terminal: Console) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 to `log_path` while `terminal` still reaches the
    screen: library warnings, logging, tqdm bars and the C++ engines' prints all land in the log.

    Redirecting the descriptors, not `sys.stdout`, is what catches the output of native code.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    screen = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8")
    previous_file = terminal.file
    terminal.file = screen
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.file = previous_file
        screen.close()
