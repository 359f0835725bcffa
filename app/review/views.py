"""What the review UI's pages share: the store, settings, identity, notices and the queue in session state.
Each page draws itself in `screens/<page>.py`; data comes from the plain modules beside this one.

Session state (all keys start with `mnr_`):
    mnr_queue      the queue as loaded (DataFrame), with mnr_queue_key: the (annotator, filters) it is for
    mnr_filters    the queue filters chosen on the queue page (`QueueFilters`)
    mnr_current    the item on screen: {"item": ReviewItem, "shown": ShownItem, "source", "reason"}
    mnr_done       (pair_id, scheme) decided or skipped in this session, so they are not shown again
    mnr_focus      (pair_id, scheme or None, source) asked for by the queue or audit page
    mnr_notices    messages for the next run: [(kind, text)], kind one of success, warning, error, info
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app.review.queue import QueueFilters, load_queue
from app.review.settings import IdentityError, ReviewSettings, check_identity
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


def identity_sidebar(review_settings: ReviewSettings) -> str | None:
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


def annotator() -> str | None:
    """The identity entered in the sidebar (validated again on every write)."""
    return st.session_state.get("mnr_annotator")


def require_identity() -> str:
    name = annotator()
    if not name:
        st.info("Enter your name or annotator id in the sidebar first: no decision is written without one.")
        st.stop()
    return name


def notify(kind: str, text: str) -> None:
    st.session_state.setdefault("mnr_notices", []).append((kind, text))


def show_notices() -> None:
    for kind, text in st.session_state.pop("mnr_notices", []):
        getattr(st, kind)(text)


def set_annotator(name: str | None) -> None:
    """Remember the identity; a different annotator starts with a fresh session queue."""
    if st.session_state.get("mnr_annotator") != name:
        for key in ("mnr_current", "mnr_done", "mnr_decided", "mnr_queue", "mnr_queue_key"):
            st.session_state.pop(key, None)
        st.session_state["mnr_annotator"] = name


# -- queue state --------------------------------------------------------------------------------
def current_filters() -> QueueFilters:
    return st.session_state.get("mnr_filters", QueueFilters())


def queue(refresh: bool = False) -> pd.DataFrame:
    """The queue for this annotator and filters, loaded once and kept until refreshed."""
    key = (annotator(), current_filters())
    if refresh or st.session_state.get("mnr_queue_key") != key or "mnr_queue" not in st.session_state:
        st.session_state["mnr_queue"] = load_queue(store(), annotator(), current_filters(), settings())
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
