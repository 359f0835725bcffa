"""The review UI's Streamlit entry point: `mnr review` runs `streamlit run` on this file.

The store comes from MNR_STORE (set by `mnr review --store`) or mnr.toml; `[review]` settings
from mnr.toml. Each page draws itself in `screens/<page>.py`; what they share is in `app/review/views.py`.
"""
from __future__ import annotations

import streamlit as st

from app.review import views

st.set_page_config(page_title="mnr review", page_icon=":material/rate_review:", layout="wide")
st.sidebar.title("mine-refine review")
views.set_annotator(views.identity_sidebar(views.settings()))
navigation = st.navigation([
    st.Page("screens/review.py", title="Review", icon=":material/rate_review:", default=True),
    st.Page("screens/queue.py", title="Queue", icon=":material/list:"),
    st.Page("screens/agreement.py", title="Agreement", icon=":material/handshake:"),
    st.Page("screens/audit.py", title="Audit", icon=":material/flag:"),
])
st.sidebar.caption(f"Store: `{views.store().path}`")
navigation.run()
