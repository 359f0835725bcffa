"""Annotator accounts: who may write labels through the review UI, in which role.

A token is shown once, when it is made (`add_account`, `reset_token`); the store keeps only a salted
scrypt hash of it and compares in constant time. Every change to an account and every login attempt,
accepted or refused, is appended to `account_events` (migration 0009), so the trail survives a
disabled or re-keyed account. The CLI (`mnr annotators`) and the review UI both go through here.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import duckdb
import pandas as pd

from labelstore.errors import MnrError
from labelstore.sqlfiles import sql
from labelstore.store import Store, utcnow

ROLES = ("annotator", "admin")
ANNOTATOR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_BYTES = 24
# scrypt at n=2**14, r=8 costs ~16 MiB and tens of milliseconds a try: cheap for one login, dear for a guesser.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
REFUSED = "name or token not accepted"
# After this many failed logins under one name in the window, that name is refused without a token check.
MAX_FAILURES, FAILURE_WINDOW = 10, timedelta(minutes=15)


class AccountError(MnrError):
    """An account command cannot be done: a bad name or role, an account that exists or does not."""


class AuthError(MnrError):
    """A login or a write was refused: wrong token, unknown or disabled account."""


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    disabled: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def check_name(name: str | None, error: type[MnrError] = AccountError) -> str:
    """`name` stripped; raises `error` unless it is a valid annotator id."""
    name = (name or "").strip()
    if not ANNOTATOR_ID.match(name):
        raise error(f"annotator id '{name}' is not valid: use 1-64 letters, digits, '.', '_', '@' or '-', "
                           "starting with a letter or digit")
    return name


def hash_token(token: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def token_matches(token: str, stored: str) -> bool:
    """Whether `token` hashes to `stored` (made by `hash_token`); the comparison takes constant time."""
    kind, n, r, p, salt, digest = stored.split("$")
    if kind != "scrypt":
        return False
    candidate = hashlib.scrypt(token.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


@functools.cache
def _unknown_name_hash() -> str:
    return hash_token("", salt=b"\0" * 16)


def add_account(store: Store, name: str, role: str) -> str:
    """Create an account; returns its token, which is not stored and cannot be shown again."""
    name = check_name(name)
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, not '{role}'")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with store.transaction() as con:
        if _get(con, name) is not None:
            raise AccountError(f"account '{name}' exists already; `mnr annotators reset-token {name}` gives it a new token")
        con.execute(sql("labelstore", "account_insert"),
                    {"name": name, "role": role, "token_hash": hash_token(token), "created_at": utcnow()})
        _event(con, "add", name, "cli", f"role {role}")
    return token


def reset_token(store: Store, name: str) -> str:
    """A new token for `name` (the old one stops working); returns it."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with store.transaction() as con:
        _existing(con, name)
        con.execute(sql("labelstore", "account_update"), {"name": name, "disabled": None, "token_hash": hash_token(token)})
        _event(con, "reset_token", name, "cli", None)
    return token


def disable_account(store: Store, name: str, disabled: bool = True) -> None:
    """`name` can no longer log in or write (or can again, with `disabled=False`); its decisions and events stay."""
    with store.transaction() as con:
        _existing(con, name)
        con.execute(sql("labelstore", "account_update"), {"name": name, "disabled": disabled, "token_hash": None})
        _event(con, "disable" if disabled else "enable", name, "cli", None)


def list_accounts(store: Store) -> pd.DataFrame:
    """Columns name, role, disabled, created_at, last_login, failed_logins."""
    return store.df(sql("labelstore", "accounts_list"))


def get_account(store: Store, name: str) -> Account | None:
    """The account as it is now (role, disabled), or None."""
    with store.connect() as con:
        found = _get(con, name)
    return None if found is None else found[0]


def has_accounts(store: Store) -> bool:
    """Whether the store has accounts (disabled ones count): then the review UI asks for a token."""
    return bool(store.scalar(sql("labelstore", "accounts_count")))


def authenticate(store: Store, name: str, token: str) -> Account:
    """The account when `token` is its token and it is enabled; else `AuthError`. Both outcomes are logged.

    After `MAX_FAILURES` failed logins under one name within `FAILURE_WINDOW`, even the right token is
    refused until the window has passed: guessing costs a scrypt per try and stops soon.
    """
    name = (name or "").strip()
    if not ANNOTATOR_ID.match(name):
        # never an account: refused like a wrong token, and only a bounded prefix reaches the log
        return _log_in(store, name[:64], "token", lambda con: (None, REFUSED, "malformed name"))

    def judge(con: duckdb.DuckDBPyConnection) -> tuple[Account | None, str | None, str | None]:
        failures = con.execute(sql("labelstore", "account_recent_failures"),
                               {"name": name, "since": utcnow() - FAILURE_WINDOW}).fetchone()[0]
        if failures >= MAX_FAILURES:
            minutes = int(FAILURE_WINDOW.total_seconds() // 60)
            return None, f"too many failed logins for '{name}': try again in {minutes} minutes", "too many failures"
        found = _get(con, name)
        # an unknown name costs the same scrypt as a known one, so timing does not tell which names exist
        matches = token_matches(token or "", found[1] if found else _unknown_name_hash())
        if found is None or not token or not matches:
            return None, REFUSED, "unknown account" if found is None else "wrong token"
        return _enabled(found[0])

    return _log_in(store, name, "token", judge)


def admit_header(store: Store, name: str, header: str) -> Account:
    """The identity a trusted proxy vouched for in `header`: its account's role when it has one, else annotator.

    A disabled account is refused. The login is logged with method 'header'.
    """
    def judge(con: duckdb.DuckDBPyConnection) -> tuple[Account | None, str | None, str | None]:
        if not ANNOTATOR_ID.match(name or ""):
            return None, f"the {header} header holds no valid annotator id", f"malformed {header}"
        found = _get(con, name)
        return _enabled(found[0]) if found else (Account(name, "annotator"), None, header)

    return _log_in(store, (name or "")[:64], "header", judge)


def _enabled(account: Account) -> tuple[Account | None, str | None, str | None]:
    if account.disabled:
        return None, f"account '{account.name}' is disabled; ask an admin", "account disabled"
    return account, None, None


def _log_in(store: Store, name: str, method: str,
            judge: Callable[[duckdb.DuckDBPyConnection], tuple[Account | None, str | None, str | None]]) -> Account:
    """`judge` gives (account, refusal, detail); the attempt is logged and committed before a refusal is raised,
    so failed logins stay in the audit trail."""
    with store.transaction() as con:
        account, refusal, detail = judge(con)
        _event(con, "login_failed" if refusal else "login", name, method, detail)
    if refusal is not None or account is None:
        raise AuthError(refusal or REFUSED)
    return account


def check_writer(con: duckdb.DuckDBPyConnection, name: str, need_admin: bool = False, vouched: bool = False) -> None:
    """Inside a write transaction, raise `AuthError` unless `name` may write now: an enabled account (an admin
    for `need_admin`), so an account disabled mid-session writes nothing more. A name without an account
    writes only while the store has no accounts (single-user mode) or when a trusted proxy `vouched` for it."""
    found = _get(con, name)
    if found is None:
        if need_admin:
            raise AuthError(f"'{name}' is not an admin account: only admins adjudicate "
                            "(`mnr annotators add NAME --role admin`)")
        if vouched or not con.execute(sql("labelstore", "accounts_count")).fetchone()[0]:
            return
        raise AuthError(f"'{name}' is not an enabled account: nothing was written")
    account = found[0]
    if account.disabled:
        raise AuthError(f"'{name}' is not an enabled account: nothing was written")
    if need_admin and not account.is_admin:
        raise AuthError(f"'{name}' is not an admin: only admins adjudicate")


def _get(con: duckdb.DuckDBPyConnection, name: str) -> tuple[Account, str] | None:
    row = con.execute(sql("labelstore", "account_get"), {"name": name}).fetchone()
    return None if row is None else (Account(row[0], row[1], bool(row[3])), row[2])


def _existing(con: duckdb.DuckDBPyConnection, name: str) -> Account:
    found = _get(con, name)
    if found is None:
        raise AccountError(f"no account '{name}' (see `mnr annotators list`)")
    return found[0]


def _event(con: duckdb.DuckDBPyConnection, action: str, account: str, method: str | None, detail: str | None) -> None:
    con.execute(sql("labelstore", "account_event"),
                {"action": action, "account": account, "method": method, "detail": detail, "created_at": utcnow()})
