"""The audit page: the latest audit run, its report files and flags, with links to review each flagged pair.

A Streamlit page script, run by the navigation in `app/review/ui.py`; the shared state is in `app.review.views`.
"""
from __future__ import annotations

import streamlit as st
import streamlit.components.v1 as components

from app.review.audit import latest_audit
from app.review.views import REVIEW_PAGE, store


FLAG_LINKS = 50
REPORT_HEIGHT = 900


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


audit_page()
