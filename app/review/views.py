"""What each page of the review UI draws. Data comes from the plain modules beside this one.

Session state (all keys start with `mnr_`):
    mnr_queue      the queue as loaded (DataFrame), with mnr_queue_key: the (annotator, filters) it is for
    mnr_filters    the queue filters chosen on the queue page (`QueueFilters`)
    mnr_current    the item on screen: {"item": ReviewItem, "shown": ShownItem, "source", "reason"}
    mnr_done       (pair_id, scheme) decided or skipped in this session, so they are not shown again
    mnr_focus      (pair_id, scheme or None, source) asked for by the queue or audit page
    mnr_notices    messages for the next run: [(kind, text)], kind one of success, warning, error, info
"""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st
import streamlit.components.v1 as components

from app.review.agreement import (
    annotator_vs_llm, between_annotators, confusion, decisions_frame, is_graded, kappa_trend, shared_items,
)
from app.review.audit import latest_audit
from app.review.decisions import record_decision, record_skip, show, undo_last
from app.review.item import ReviewItem, load_item, scheme_of_pair
from app.review.queue import QUEUE_SOURCES, QueueFilters, filter_choices, load_queue, queue_counts
from app.review.settings import IdentityError, ReviewSettings, check_identity
from labelstore.config import store_path
from labelstore.errors import MnrError
from labelstore.schemes import LabelScheme, load_scheme
from labelstore.store import Store

REVIEW_PAGE = "screens/review.py"
SKIP_SHORTCUT = "S"
UNDO_SHORTCUT = "U"
QUEUE_TABLE_ROWS = 200
FLAG_LINKS = 50
REPORT_HEIGHT = 900


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


def _guarded(action: Callable[[], None]) -> None:
    try:
        action()
    except MnrError as exc:
        notify("error", str(exc))


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


def _show_item(item: ReviewItem, source: str, reason: str) -> None:
    st.session_state["mnr_current"] = {"item": item, "shown": show(item, source), "source": source, "reason": reason}


def _next_item() -> None:
    """Put the best item not yet done on screen (reloading the queue once when it runs dry), or nothing."""
    st.session_state.pop("mnr_current", None)
    focus = st.session_state.pop("mnr_focus", None)
    if focus is not None:
        pair_id, scheme, source = focus
        scheme = scheme or scheme_of_pair(store(), pair_id, settings().default_scheme)
        try:
            _show_item(load_item(store(), pair_id, scheme), source, f"opened from the {source} page")
            return
        except MnrError as exc:
            notify("error", f"{exc}; showing the next item in the queue instead")
    left = remaining(queue())
    if left.empty:
        left = remaining(queue(refresh=True))
    if left.empty:
        return
    row = left.iloc[0]
    _show_item(load_item(store(), row["pair_id"], row["scheme"]), row["source"], row["reason"])


def focus_on(pair_id: str, scheme: str | None, source: str) -> None:
    """Open this pair next on the review page."""
    st.session_state["mnr_focus"] = (pair_id, scheme, source)
    st.session_state.pop("mnr_current", None)


# -- review page actions (button callbacks: they run before the page is drawn again) ------------
def _decide(label: str) -> None:
    current = st.session_state.get("mnr_current")
    if current is None:
        return
    shown = current["shown"]
    comment = st.session_state.get(f"mnr_comment_{shown.decision_id}")

    def write() -> None:
        result = record_decision(store(), shown, annotator(), label, comment, settings().allow)
        done().add((shown.pair_id, shown.scheme))
        st.session_state["mnr_decided"] = st.session_state.get("mnr_decided", 0) + 1
        if result.changed_since_shown:
            notify("warning", result.change_message())
        else:
            notify("success", f"Saved '{result.label}' for “{current['item'].query}”.")
        _next_item()

    _guarded(write)


def _skip() -> None:
    current = st.session_state.get("mnr_current")
    if current is None:
        return
    shown = current["shown"]

    def write() -> None:
        record_skip(store(), shown, annotator(), settings().allow)
        done().add((shown.pair_id, shown.scheme))
        notify("info", f"Skipped “{current['item'].query}”.")
        _next_item()

    _guarded(write)


def _undo() -> None:
    def write() -> None:
        undone = undo_last(store(), annotator(), settings().allow)
        if undone is None:
            notify("info", "Nothing to undo: you have no decision left to take back.")
            return
        done().discard((undone.pair_id, undone.scheme))
        st.session_state["mnr_decided"] = max(0, st.session_state.get("mnr_decided", 0) - 1)
        notify("success", f"Undid your '{undone.label}'; the pair is shown again.")
        focus_on(undone.pair_id, undone.scheme, "undo")
        _next_item()

    _guarded(write)


def _reset_skips() -> None:
    st.session_state["mnr_done"] = set()
    queue(refresh=True)


# -- review page --------------------------------------------------------------------------------
def review_page() -> None:
    name = require_identity()
    if "pair" in st.query_params:
        focus_on(st.query_params["pair"], st.query_params.get("scheme"), "audit")
        st.query_params.clear()
    if "mnr_current" not in st.session_state:
        _next_item()
    show_notices()
    current = st.session_state.get("mnr_current")
    frame = queue()
    left = len(remaining(frame))
    decided = st.session_state.get("mnr_decided", 0)
    if current is None:
        st.success(f"Nothing left to review for {name} with these filters. Decided in this session: {decided}.")
        if st.session_state.get("mnr_done"):
            st.button("Show skipped items again", on_click=_reset_skips)
        st.button(f"Undo last decision ({UNDO_SHORTCUT})", key="mnr_undo", shortcut=UNDO_SHORTCUT, on_click=_undo)
        return
    item: ReviewItem = current["item"]
    scheme = load_scheme(item.scheme)
    position = decided + 1
    total = decided + max(left, 1)
    st.caption(f"Item {position} of {total} · queued as **{current['source']}**: {current['reason']} · "
               f"scheme {scheme.name} · dataset {item.dataset}")
    st.markdown(f"### Query: “{item.query}”")
    content, evidence = st.columns([3, 2], gap="large")
    with content:
        _product(item)
        _definitions(scheme)
    with evidence:
        _llm_label(item, scheme)
        _engagement(item)
        _earlier_humans(item, blind=current["source"] == "overlap")
    _decision_buttons(scheme, current["shown"].decision_id)


def _product(item: ReviewItem) -> None:
    st.markdown(f"**Product:** {item.title}")
    if item.brand:
        st.markdown(f"**Brand:** {item.brand}")
    st.markdown(f"**Description:** {item.description or '_none given_'}")
    reference = item.reference_label
    if reference is not None:
        st.caption(f"Dataset label ({reference['source']}): {reference['label']}")


def _definitions(scheme: LabelScheme) -> None:
    st.markdown("**Label definitions (policy)**")
    lines = [f"- **{index}** · **{label.name}** — {label.definition}" for index, label in enumerate(scheme.labels, 1)]
    st.markdown("\n".join(lines))


def _llm_label(item: ReviewItem, scheme: LabelScheme) -> None:
    llm = item.llm_label
    if llm is None:
        st.markdown("**LLM label:** none yet")
        return
    confidence = f" ({llm['confidence']:.0%})" if pd.notna(llm["confidence"]) else ""
    st.markdown(f"**LLM label:** {llm['label']}{confidence}")
    probs = item.llm_probs
    for name in scheme.label_names:
        if name in probs:
            st.progress(min(max(probs[name], 0.0), 1.0), text=f"{name} {probs[name]:.0%}")
    st.caption(f"by {llm['author']}")


def _engagement(item: ReviewItem) -> None:
    evidence = item.engagement
    st.markdown("**Engagement**" + (" (simulated)" if evidence.simulated else ""))
    if not evidence.impressions:
        st.caption("No engagement logged for this pair.")
        return
    impressions, ctr, coec, cart = st.columns(4)
    impressions.metric("Impressions", f"{evidence.impressions:,}")
    ctr.metric("CTR", f"{evidence.ctr:.0%}" if evidence.ctr is not None else "–")
    coec.metric("COEC", f"{evidence.coec:.2f}" if evidence.coec is not None else "–",
                help="Clicks over expected clicks at the positions shown: above 1 means clicked more than its position predicts.")
    cart.metric("Add to cart", f"{evidence.add_to_cart:,}")


def _earlier_humans(item: ReviewItem, blind: bool) -> None:
    humans = item.human_labels
    st.markdown("**Earlier human labels**")
    if humans.empty:
        st.caption("None.")
        return
    if blind:
        st.caption(f"{len(humans)} hidden: this is a blind second opinion for the agreement numbers.")
        return
    shown = humans.assign(when=humans["created_at"].astype(str).str[:16])
    shown["label"] = shown["label"].where(~shown["undone"], shown["label"] + " (undone)")
    st.dataframe(shown[["label", "author", "when", "comment"]], hide_index=True, width="stretch")


def _decision_buttons(scheme: LabelScheme, decision_id: str) -> None:
    st.text_input("Comment (optional)", key=f"mnr_comment_{decision_id}")
    columns = st.columns(len(scheme.labels) + 2)
    for index, (column, label) in enumerate(zip(columns, scheme.labels), 1):
        column.button(label.name, key=f"mnr_label_{label.name}", shortcut=str(index), on_click=_decide,
                      args=(label.name,), type="primary", width="stretch", help=label.definition)
    columns[-2].button("Skip", key="mnr_skip", shortcut=SKIP_SHORTCUT, on_click=_skip, width="stretch")
    columns[-1].button("Undo last", key="mnr_undo", shortcut=UNDO_SHORTCUT, on_click=_undo, width="stretch")
    st.caption(f"Keys: 1–{len(scheme.labels)} label · {SKIP_SHORTCUT} skip · {UNDO_SHORTCUT} undo last")


# -- queue page ---------------------------------------------------------------------------------
def queue_page() -> None:
    name = require_identity()
    choices = filter_choices(store())
    old = current_filters()
    with st.form("mnr_filters_form"):
        first, second, third, fourth = st.columns(4)
        sources = first.multiselect("Source", QUEUE_SOURCES, default=list(old.sources))
        label = second.selectbox("Current label", [None, *choices["label"]], format_func=_any,
                                 index=([None, *choices["label"]].index(old.label) if old.label in choices["label"] else 0))
        text = third.text_input("Query text contains", value=old.query_text or "")
        dataset = fourth.selectbox("Dataset", [None, *choices["dataset"]], format_func=_any,
                                   index=([None, *choices["dataset"]].index(old.dataset) if old.dataset in choices["dataset"] else 0))
        applied = st.form_submit_button("Apply filters")
    if applied:
        st.session_state["mnr_filters"] = QueueFilters(tuple(sources), label, text.strip() or None, dataset)
        st.session_state.pop("mnr_current", None)
    refresh = st.button("Refresh queue")
    frame = queue(refresh=refresh)
    left = remaining(frame)
    counts = queue_counts(left)
    decided = st.session_state.get("mnr_decided", 0)
    st.markdown(f"**{name}**: {counts['total']} items waiting · decided in this session: {decided} · "
                f"current position: item {decided + 1} of {decided + counts['total']}")
    metrics = st.columns(len(QUEUE_SOURCES))
    for column, source in zip(metrics, QUEUE_SOURCES):
        column.metric(source, counts[source])
    st.dataframe(left.head(QUEUE_TABLE_ROWS)[["source", "reason", "query", "title", "current_label", "current_source",
                                              "dataset", "scheme", "pair_id"]],
                 hide_index=True, width="stretch")
    if left.empty:
        return
    options = list(range(min(len(left), QUEUE_TABLE_ROWS)))
    pick = st.selectbox("Open one item", options, format_func=lambda i: f"{left.iloc[i]['query']} → {left.iloc[i]['title']}")
    if st.button("Review this item", type="primary"):
        row = left.iloc[pick]
        focus_on(row["pair_id"], row["scheme"], row["source"])
        st.switch_page(REVIEW_PAGE)


def _any(value: str | None) -> str:
    return "any" if value is None else value


# -- agreement page -----------------------------------------------------------------------------
def agreement_page() -> None:
    review_settings = settings()
    schemes = [row[0] for row in store().fetchall(
        "SELECT DISTINCT scheme FROM live_labels WHERE source = 'human' ORDER BY 1")]
    st.markdown(f"Overlap share: **{review_settings.overlap:.0%}** of single-annotator items go to a second annotator "
                "(`[review] overlap` in mnr.toml).")
    if not schemes:
        st.info("No human decisions yet.")
        return
    scheme = load_scheme(st.selectbox("Scheme", schemes) if len(schemes) > 1 else schemes[0])
    weighting = "quadratic-weighted" if is_graded(scheme) else "unweighted"
    decisions = decisions_frame(store(), scheme)
    st.subheader(f"Each annotator vs the LLM (Cohen's kappa, {weighting})")
    versus_llm = annotator_vs_llm(decisions, scheme)
    st.dataframe(versus_llm, hide_index=True)
    st.subheader("Between annotators, on items both decided")
    between = between_annotators(decisions, scheme)
    if between.empty:
        st.caption("No item has been decided by two annotators yet.")
    else:
        st.dataframe(between, hide_index=True)
    st.subheader("Confusion matrices")
    names = sorted(decisions["annotator"].unique())
    who = st.selectbox("Annotator (rows) vs the LLM (columns)", names)
    mine = decisions[(decisions["annotator"] == who)].dropna(subset=["llm_label"])
    st.dataframe(confusion(mine["label"], mine["llm_label"], scheme))
    shared = shared_items(decisions)
    if not shared.empty:
        pairs = sorted(set(zip(shared["annotator_a"], shared["annotator_b"])))
        first, second = st.selectbox("Annotator pair (rows vs columns)", pairs, format_func=lambda p: f"{p[0]} vs {p[1]}")
        both = shared[(shared["annotator_a"] == first) & (shared["annotator_b"] == second)]
        st.dataframe(confusion(both["label_a"], both["label_b"], scheme))
    st.subheader("Trend: kappa vs the LLM per day")
    trend = kappa_trend(decisions, scheme)
    if trend.empty:
        st.caption("No decision on an item the LLM labelled yet.")
    else:
        st.line_chart(trend.pivot(index="period", columns="annotator", values="kappa"))


# -- audit page ---------------------------------------------------------------------------------
def audit_page() -> None:
    view = latest_audit(store())
    if view.run is None:
        st.info("No audit has run yet: `mnr audit` writes the report and the flags shown here.")
        return
    run = view.run
    st.markdown(f"**Audit run** `{run['run_id']}` · {run['status']} · started {str(run['started_at'])[:19]}")
    if run["metrics"]:
        with st.expander("Report metrics", expanded=True):
            st.json(run["metrics"])
    for path in view.report_files:
        with st.expander(f"Report file: {path}", expanded=path.suffix == ".html"):
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".html":
                components.html(text, height=REPORT_HEIGHT, scrolling=True)
            elif path.suffix == ".md":
                st.markdown(text)
            else:
                st.code(text[:20000], language="json")
    flags = view.flags
    st.subheader(f"Flags ({len(flags)})")
    if flags.empty:
        st.caption("This audit flagged nothing.")
        return
    st.dataframe(flags[["kind", "reason", "score", "query", "title", "current_label", "current_source", "pair_id"]],
                 hide_index=True, width="stretch")
    st.markdown(f"**Review a flagged pair** (strongest {min(len(flags), FLAG_LINKS)})")
    for flag in flags.head(FLAG_LINKS).itertuples():
        params = {"pair": flag.pair_id}
        if isinstance(flag.scheme, str):
            params["scheme"] = flag.scheme
        st.page_link(REVIEW_PAGE, label=f"{flag.kind}: “{flag.query}” → {flag.title} ({flag.reason})",
                     query_params=params)
