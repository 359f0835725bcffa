"""The adjudication page (admins only): pairs the annotators disagree on, each annotator's label, and
the admin's final label, which becomes the pair's current label.

A Streamlit page script, run by the navigation in `app/review/ui.py`; the shared state is in `app.review.views`.
"""
from __future__ import annotations

import streamlit as st

from app.review.decisions import adjudicate
from app.review.views import is_admin, notify, require_identity, show_notices, store
from labelstore.errors import MnrError
from labelstore.schemes import load_scheme
from labelstore.sqlfiles import sql


def adjudicate_page() -> None:
    admin = require_identity()
    if not is_admin():
        st.error("Only admins adjudicate.")
        st.stop()
    show_notices()
    schemes = [row[0] for row in store().fetchall(sql("app.review", "human_schemes"))]
    if not schemes:
        st.info("No human decisions yet.")
        return
    scheme = load_scheme(st.selectbox("Scheme", schemes) if len(schemes) > 1 else schemes[0])
    disputes = store().df(sql("app.review", "disagreements"), {"scheme": scheme.name})
    st.subheader(f"Disagreements waiting ({len(disputes)})")
    if disputes.empty:
        st.success("No open disagreement: every pair two annotators decided differently has been adjudicated.")
        return
    st.dataframe(disputes[["query", "title", "decisions", "pair_id"]], hide_index=True, width="stretch")
    pick = st.selectbox("Pair", range(len(disputes)),
                        format_func=lambda i: f"{disputes.iloc[i]['query']} → {disputes.iloc[i]['title']}")
    row = disputes.iloc[pick]
    st.markdown(f"**Query:** {row['query']}  \n**Product:** {row['title']}  \n**Decisions:** {row['decisions']}")
    with st.form("mnr_adjudicate"):
        label = st.radio("Final label", scheme.label_names, horizontal=True, key="mnr_adjudicate_label")
        comment = st.text_input("Why (optional)", key="mnr_adjudicate_comment")
        submitted = st.form_submit_button("Adjudicate", type="primary")
    if submitted:
        try:
            done = adjudicate(store(), row["pair_id"], scheme.name, admin, label, comment)
        except MnrError as exc:
            st.error(str(exc))
            return
        notify("success", f"Adjudicated '{done.label}' ({done.decisions}).")
        st.rerun()


adjudicate_page()
