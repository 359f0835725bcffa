"""The `mnr` command line. Each area registers its commands from its own module."""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Optional

import typer
from rich.markup import escape

from app.context import STORE_HELP, add_store_option, err_console, state
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
    "app.commands_accounts",
    "app.commands_loop",
    "app.commands_finetune",
)


# Warnings from our own packages stay visible; the libraries' (FutureWarning and the like) need --verbose.
OWN_MODULES = r"(labelstore|annotator|auditor|trainer|app)(\.|$)"


@app.callback()
def _global(
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP, envvar="MNR_STORE"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library warnings, logs and progress bars "
                                 "(`mnr demo` otherwise writes them to a log file in its workspace)."),
) -> None:
    state.store = store
    state.verbose = verbose
    if verbose:
        warnings.resetwarnings()
        warnings.simplefilter("default")


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)
add_store_option(app)


def quiet_library_warnings() -> None:
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=OWN_MODULES)


def main() -> None:
    quiet_library_warnings()
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
