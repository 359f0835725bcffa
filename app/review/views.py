"""What the review UI's pages share: the store, settings, identity, notices and the queue in session state.
Each page draws itself in `screens/<page>.py`; data comes from the plain modules beside this one.

Session state (all keys start with `mnr_`):
    mnr_queue      the queue as loaded (DataFrame), with mnr_queue_key: the (annotator, filters) it is for
    mnr_filters    the queue filters chosen on the queue page (`QueueFilters`)
    mnr_current    the item on screen: {"item": ReviewItem, "shown": ShownItem, "source", "reason"}
    mnr_done       (pair_id, scheme) decided or skipped in this session, so they are not shown again
    mnr_focus      (pair_id, scheme or None, source) asked for by the queue or audit page
    mnr_notices    messages for the next run: [(kind, text)], kind one of success, warning, error, info
    mnr_account    the account that logged in (token or trusted header); absent in single mode
    mnr_reviewer   the reviewer with their role (`Account`), mnr_annotator their id: what every write carries
"""
from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from app.review.queue import QueueFilters, load_queue
from app.review.settings import ADDRESS_ENV, IdentityError, ReviewSettings, check_identity, is_loopback
from labelstore.accounts import Account, AuthError, admit_header, authenticate, get_account, has_accounts
from labelstore.config import store_path
from labelstore.store import Store

REVIEW_PAGE = "screens/review.py"


# -- shared pieces ------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _store(path: str) -> Store:
    return Store(path)


def store() -> Store:
    """The store named by MNR_STORE / mnr.toml (`mnr review --store` sets MNR_STORE)."""
    return _store(store_path())


def settings() -> ReviewSettings:
    return ReviewSettings.from_config()


def auth_mode(review_settings: ReviewSettings) -> str:
    """'header' (a trusted proxy names the user), 'accounts' (name and token), or 'single' (a name, loopback only)."""
    if review_settings.trusted_header:
        return "header"
    return "accounts" if has_accounts(store()) else "single"


def sign_in(review_settings: ReviewSettings) -> Account | None:
    """Who is reviewing, by the auth mode; draws the sidebar's login and returns the account, or None.

    In single mode the reviewer is an admin of their own store (every page), on loopback only.
    """
    mode = auth_mode(review_settings)
    if mode == "header":
        return _header_sign_in(review_settings.trusted_header)
    if mode == "accounts":
        return _token_sign_in()
    # `mnr review` names the address; run by `streamlit run` without one, Streamlit listens on every interface
    if not is_loopback(os.environ.get(ADDRESS_ENV) or st.get_option("server.address") or ""):
        st.error("This review UI is reachable beyond loopback but the store has no accounts: nothing can be "
                 "reviewed. Create accounts with `mnr annotators add` or set `[review] trusted_header`.")
        st.stop()
    name = _name_sidebar(review_settings)
    return None if name is None else Account(name, "admin")


def _header_sign_in(header: str) -> Account | None:
    value = (st.context.headers.get(header) or "").strip()
    if not value:
        st.error(f"Refused: the request carries no {header} header. This UI is meant to be reached through the "
                 "single sign-on proxy that sets it.")
        st.stop()
    account: Account | None = st.session_state.get("mnr_account")
    if account is None or account.name != value:
        try:
            account = admit_header(store(), value, header)
        except AuthError as exc:
            st.error(str(exc))
            st.stop()
        st.session_state["mnr_account"] = account
    st.sidebar.success(f"Signed in as **{account.name}** ({account.role}) by {header}")
    return account


def _token_sign_in() -> Account | None:
    account: Account | None = st.session_state.get("mnr_account")
    if account is not None:
        account = get_account(store(), account.name)  # a role changed or an account disabled takes effect now
        if account is None or account.disabled:
            st.session_state.pop("mnr_account", None)
            st.sidebar.error("Your account was disabled; you are logged out.")
            return None
        st.session_state["mnr_account"] = account
        st.sidebar.success(f"Logged in as **{account.name}** ({account.role})")
        if st.sidebar.button("Log out", key="mnr_logout"):
            st.session_state.pop("mnr_account", None)
            st.rerun()
        return account
    with st.sidebar.form("mnr_login"):
        name = st.text_input("Annotator name", key="mnr_login_name")
        token = st.text_input("Token", key="mnr_login_token", type="password",
                              help="The token `mnr annotators add` printed for you.")
        submitted = st.form_submit_button("Log in")
    if submitted:
        try:
            st.session_state["mnr_account"] = authenticate(store(), name, token)
        except AuthError as exc:
            st.sidebar.error(str(exc))
            return None
        st.rerun()
    st.sidebar.info("Log in with your annotator name and token to start reviewing.")
    return None


def _name_sidebar(review_settings: ReviewSettings) -> str | None:
    """Ask for the annotator's id in the sidebar; the valid id, or None."""
    entered = st.sidebar.text_input(
        "Your name or annotator id", key="mnr_identity",
        help="Every decision you make is recorded under this id.",
    )
    if not entered.strip():
        st.sidebar.info("Enter your name or id to start reviewing.")
        return None
    try:
        annotator = check_identity(entered, review_settings.allow)
    except IdentityError as exc:
        st.sidebar.error(str(exc))
        return None
    st.sidebar.success(f"Reviewing as **{annotator}**")
    return annotator


def reviewer() -> Account | None:
    """The signed-in reviewer with their role (set by `set_annotator`)."""
    return st.session_state.get("mnr_reviewer")


def vouched() -> bool:
    """Whether a trusted proxy vouched for the reviewer (header mode): writes then need no account."""
    return auth_mode(settings()) == "header"


def is_admin() -> bool:
    account = reviewer()
    return account is not None and account.is_admin


def annotator() -> str | None:
    """The identity entered in the sidebar (validated again on every write)."""
    return st.session_state.get("mnr_annotator")


def require_identity() -> str:
    name = annotator()
    if not name:
        st.info("Log in or enter your name or annotator id in the sidebar first: no decision is written without one.")
        st.stop()
    return name


def notify(kind: str, text: str) -> None:
    st.session_state.setdefault("mnr_notices", []).append((kind, text))


def show_notices() -> None:
    for kind, text in st.session_state.pop("mnr_notices", []):
        getattr(st, kind)(text)


def set_annotator(account: Account | None) -> None:
    """Remember the identity; a different annotator starts with a fresh session queue."""
    name = None if account is None else account.name
    if st.session_state.get("mnr_annotator") != name:
        for key in ("mnr_current", "mnr_done", "mnr_decided", "mnr_queue", "mnr_queue_key"):
            st.session_state.pop(key, None)
        st.session_state["mnr_annotator"] = name
    st.session_state["mnr_reviewer"] = account


# -- queue state --------------------------------------------------------------------------------
def current_filters() -> QueueFilters:
    return st.session_state.get("mnr_filters", QueueFilters())


def queue(refresh: bool = False) -> pd.DataFrame:
    """The queue for this annotator and filters, loaded once and kept until refreshed."""
    key = (annotator(), current_filters())
    if refresh or st.session_state.get("mnr_queue_key") != key or "mnr_queue" not in st.session_state:
        frame = load_queue(store(), annotator(), current_filters(), settings())
        if not is_admin():  # a dispute's reason names the human label, which annotators do not see
            frame.loc[frame["source"] == "disputed", "reason"] = "a human label differs from the LLM's"
        st.session_state["mnr_queue"] = frame
        st.session_state["mnr_queue_key"] = key
    return st.session_state["mnr_queue"]


def done() -> set[tuple[str, str]]:
    return st.session_state.setdefault("mnr_done", set())


def remaining(frame: pd.DataFrame) -> pd.DataFrame:
    """Queue rows not yet decided or skipped in this session."""
    finished = done()
    keep = [(pair, scheme) not in finished for pair, scheme in zip(frame["pair_id"], frame["scheme"])]
    return frame[keep]


def focus_on(pair_id: str, scheme: str | None, source: str) -> None:
    """Open this pair next on the review page."""
    st.session_state["mnr_focus"] = (pair_id, scheme, source)
    st.session_state.pop("mnr_current", None)
