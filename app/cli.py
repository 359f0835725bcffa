"""The `mnr` command line. Each area registers its commands from its own module."""
from __future__ import annotations

import importlib
import sys
from typing import Optional

import typer
from rich.markup import escape

from app.context import err_console, state
from labelstore.errors import MnrError

app = typer.Typer(
    name="mnr",
    help="mine-refine: graded relevance labels that stay cheap, consistent with policy, and clean.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = (
    "app.commands_store",
    "app.commands_annotator",
    "app.commands_trainer",
    "app.commands_auditor",
    "app.commands_review",
    "app.commands_loop",
    "app.commands_finetune",
)


@app.callback()
def _global(
    store: Optional[str] = typer.Option(
        None, "--store", help="Store file (default: MNR_STORE, else store.path in mnr.toml, else ./mnr.duckdb).",
        envvar="MNR_STORE",
    ),
) -> None:
    state.store = store


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    try:
        app()
    except MnrError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
