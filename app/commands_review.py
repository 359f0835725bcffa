"""`mnr review`: start the Streamlit review UI on the store."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import typer

from app.context import console, err_console, get_store_path, open_store
from app.review.settings import ReviewSettings
from labelstore.config import config_path
from labelstore.errors import MnrError

UI_SCRIPT = Path(__file__).parent / "review" / "ui.py"
LOOPBACK = "127.0.0.1"


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


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
        help="Address to bind. Anything but loopback exposes the UI (which has no login) to the network.",
    ),
) -> None:
    """Start the review UI (Streamlit) on 127.0.0.1: annotators decide the pairs that matter most."""
    ReviewSettings.from_config()  # a bad [review] section fails here, not in the browser
    store_file = Path(get_store_path()).resolve()
    open_store()  # creates the store or brings its schema up to date before the UI reads it
    if not is_loopback(address):
        err_console.print(
            f"[bold yellow]warning:[/] binding to {address}: anyone who can reach this machine on port {port} "
            "can open the review UI and write labels under any allowed name. Prefer an SSH tunnel to 127.0.0.1."
        )
    env = dict(os.environ, MNR_STORE=str(store_file))
    if config_path().is_file():
        env["MNR_CONFIG"] = str(config_path().resolve())
    console.print(f"review UI for {store_file} at http://{address}:{port} (Ctrl-C stops it)")
    try:
        completed = subprocess.run(streamlit_command(address, port), env=env, check=False)
    except FileNotFoundError as exc:
        raise MnrError(f"cannot start streamlit: {exc}") from exc
    if completed.returncode not in (0, -2, 130):
        raise typer.Exit(completed.returncode)


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""
    app.command()(review)
