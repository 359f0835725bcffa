"""The queue page: filter the review queue, see what waits by source, open one item.

A Streamlit page script, run by the navigation in `app/review/ui.py`; the shared state is in `app.review.views`.
"""
from __future__ import annotations

import streamlit as st

from app.review.queue import QUEUE_SOURCES, QueueFilters, filter_choices, queue_counts
from app.review.views import (
    REVIEW_PAGE, current_filters, focus_on, is_admin, queue, remaining, require_identity, settings, store,
)


QUEUE_TABLE_ROWS = 200


def queue_page() -> None:
    name = require_identity()
    choices = filter_choices(store())
    # the flagged source exists only when [review] flag_priority puts likely-flagged pairs first
    sources_shown = [source for source in QUEUE_SOURCES
                     if source != "flagged" or settings().flag_priority is not None]
    old = current_filters()
    with st.form("mnr_filters_form"):
        first, second, third, fourth = st.columns(4)
        sources = first.multiselect("Source", sources_shown, default=list(old.sources))
        label = None
        if is_admin():  # annotators see only their own decisions: no filtering by others' labels
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
    metrics = st.columns(len(sources_shown))
    for column, source in zip(metrics, sources_shown):
        column.metric(source, counts[source])
    # an annotator sees only their own decisions: not the labels others gave the queued pairs
    columns = ["source", "reason", "query", "title", "current_label", "current_source", "flag_probability", "dataset",
               "scheme", "pair_id"]
    if left["flag_probability"].isna().all():
        columns.remove("flag_probability")
    if not is_admin():
        columns = [column for column in columns if column not in ("current_label", "current_source")]
    st.dataframe(left.head(QUEUE_TABLE_ROWS)[columns], hide_index=True, width="stretch")
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


queue_page()
