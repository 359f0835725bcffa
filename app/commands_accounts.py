"""`mnr annotators`: the accounts that may log in to the review UI (stored in the store, see labelstore.accounts)."""
from __future__ import annotations

import typer
from rich.table import Table

from app.context import console, open_store
from labelstore.accounts import ROLES, add_account, disable_account, list_accounts, reset_token

annotators_app = typer.Typer(help="Review UI accounts: add, list, disable, enable, reset a token.", no_args_is_help=True)


def _print_token(name: str, token: str) -> None:
    console.print(f"token for [bold]{name}[/] (shown once; the store keeps only a salted hash):")
    console.print(token, markup=False, highlight=False, soft_wrap=True)


@annotators_app.command("add")
def add(
    name: str = typer.Argument(..., help="Annotator id: letters, digits, '.', '_', '@' or '-'."),
    role: str = typer.Option("annotator", "--role", help=f"One of: {', '.join(ROLES)}. Admins see everyone's "
                             "decisions and the agreement page, and adjudicate."),
) -> None:
    """Create an account and print its one-time token."""
    _print_token(name, add_account(open_store(), name, role))


@annotators_app.command("list")
def list_() -> None:
    """The accounts, their role, whether disabled, their last login."""
    frame = list_accounts(open_store())
    if frame.empty:
        console.print("no accounts: the review UI runs in single-user mode, on loopback only")
        return
    table = Table("name", "role", "disabled", "created", "last login", "failed logins")
    for row in frame.itertuples():
        last = "" if row.last_login is None or str(row.last_login) == "NaT" else str(row.last_login)[:19]
        table.add_row(row.name, row.role, "yes" if row.disabled else "", str(row.created_at)[:19], last,
                      str(row.failed_logins))
    console.print(table)


@annotators_app.command("disable")
def disable(name: str = typer.Argument(..., help="The account to disable.")) -> None:
    """Stop an account from logging in or writing; its decisions stay."""
    disable_account(open_store(), name)
    console.print(f"disabled {name}")


@annotators_app.command("enable")
def enable(name: str = typer.Argument(..., help="The disabled account to enable again.")) -> None:
    """Let a disabled account log in again (with its old token; `reset-token` gives a new one)."""
    disable_account(open_store(), name, disabled=False)
    console.print(f"enabled {name}")


@annotators_app.command("reset-token")
def reset(name: str = typer.Argument(..., help="The account that gets a new token.")) -> None:
    """Replace an account's token (the old one stops working) and print the new one."""
    _print_token(name, reset_token(open_store(), name))


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""
    app.add_typer(annotators_app, name="annotators")
