"""`mnr review`: start the Streamlit review UI on the store."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from app.context import console, err_console, get_store_path, open_store
from app.review.settings import ADDRESS_ENV, ReviewSettings, is_loopback
from labelstore.accounts import has_accounts
from labelstore.config import config_path
from labelstore.errors import MnrError

UI_SCRIPT = Path(__file__).parent / "review" / "ui.py"
LOOPBACK = "127.0.0.1"


def streamlit_command(address: str, port: int) -> list[str]:
    """The `streamlit run` command line for the review UI."""
    return [
        sys.executable, "-m", "streamlit", "run", str(UI_SCRIPT),
        "--server.address", address, "--server.port", str(port), "--server.headless", "true",
        "--server.fileWatcherType", "none", "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",
    ]


def review(
    port: int = typer.Option(8501, "--port", min=1, max=65535, help="Port to serve on."),
    address: str = typer.Option(
        LOOPBACK, "--address",
        help="Address to bind. Beyond loopback the store needs accounts (`mnr annotators add`) "
             "or `[review] trusted_header` behind a single sign-on proxy.",
    ),
) -> None:
    """Start the review UI (Streamlit) on 127.0.0.1: annotators decide the pairs that matter most."""
    review_settings = ReviewSettings.from_config()  # a bad [review] section fails here, not in the browser
    store_file = Path(get_store_path()).resolve()
    store = open_store()  # creates the store or brings its schema up to date before the UI reads it
    if not is_loopback(address):
        check_exposure(address, port, review_settings, has_accounts(store))
    env = dict(os.environ, MNR_STORE=str(store_file), **{ADDRESS_ENV: address})
    if config_path().is_file():
        env["MNR_CONFIG"] = str(config_path().resolve())
    console.print(f"review UI for {store_file} at http://{address}:{port} (Ctrl-C stops it)")
    try:
        completed = subprocess.run(streamlit_command(address, port), env=env, check=False)
    except FileNotFoundError as exc:
        raise MnrError(f"cannot start streamlit: {exc}") from exc
    if completed.returncode not in (0, -2, 130):
        raise typer.Exit(completed.returncode)


def check_exposure(address: str, port: int, review_settings: ReviewSettings, accounts: bool) -> None:
    """Refuse to serve beyond loopback without authentication; warn that tokens need TLS in front."""
    if review_settings.trusted_header:
        err_console.print(
            f"[bold yellow]note:[/] binding to {address}: identities come from the {review_settings.trusted_header} "
            f"header, so only the sign-on proxy may reach port {port}; anyone else could send that header."
        )
        return
    if not accounts:
        raise MnrError(
            f"refusing to serve the review UI on {address}: the store has no annotator accounts, so anyone who "
            f"can reach port {port} could write labels under any name. Create accounts (`mnr annotators add NAME "
            "--role admin`), or put a sign-on proxy in front and set `[review] trusted_header`, or use 127.0.0.1 "
            "with an SSH tunnel (docs/review.md)."
        )
    err_console.print(
        f"[bold yellow]note:[/] binding to {address}: tokens travel in clear over plain HTTP; put a TLS proxy in "
        "front or use an SSH tunnel."
    )


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""
    app.command()(review)
