"""The agreement page: Cohen's kappa of each annotator vs the LLM and between annotators, confusion
matrices and the trend.

A Streamlit page script, run by the navigation in `app/review/ui.py`; the shared state is in `app.review.views`.
"""
from __future__ import annotations

import streamlit as st

from app.review.agreement import (
    annotator_vs_llm, between_annotators, confusion, consensus, decisions_frame, is_graded, kappa_trend, shared_items,
    versus_consensus,
)
from app.review.views import settings, store
from labelstore.schemes import load_scheme
from labelstore.sqlfiles import sql


def agreement_page() -> None:
    review_settings = settings()
    schemes = [row[0] for row in store().fetchall(sql("app.review", "human_schemes"))]
    st.markdown(f"Blind overlap: **{review_settings.overlap:.0%}** of items go to **{review_settings.overlap_k}** "
                "annotators who do not see each other's labels (`[review] overlap`, `overlap_k` in mnr.toml).")
    if not schemes:
        st.info("No human decisions yet.")
        return
    scheme = load_scheme(st.selectbox("Scheme", schemes) if len(schemes) > 1 else schemes[0])
    weighting = "quadratic-weighted" if is_graded(scheme) else "unweighted"
    decisions = decisions_frame(store(), scheme, review_settings.overlap)
    st.subheader(f"Against the consensus on blind overlap items ({weighting} kappa)")
    agreed = consensus(decisions)
    if agreed.empty:
        st.caption("No blind overlap item has a consensus yet (two or more decisions with a majority, or an adjudication).")
    else:
        st.caption(f"{len(agreed)} items; the consensus is the adjudicated label, else the majority.")
        st.dataframe(versus_consensus(decisions, scheme), hide_index=True, key="mnr_versus_consensus")
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


agreement_page()
