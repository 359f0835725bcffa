"""The review UI's Streamlit entry point: `mnr review` runs `streamlit run` on this file.

The store comes from MNR_STORE (set by `mnr review --store`) or mnr.toml; `[review]` settings
from mnr.toml. Each page draws itself in `screens/<page>.py`; what they share is in `app/review/views.py`.
Who signs in, and how, is `views.sign_in`; annotators get the review and queue pages, admins (and the one
reviewer of single mode) the agreement and audit pages too, and admin accounts the adjudication page.
"""
from __future__ import annotations

import streamlit as st

from app.review import views

st.set_page_config(page_title="mnr review", page_icon=":material/rate_review:", layout="wide")
st.sidebar.title("mine-refine review")
review_settings = views.settings()
account = views.sign_in(review_settings)
views.set_annotator(account)
pages = [
    st.Page("screens/review.py", title="Review", icon=":material/rate_review:", default=True),
    st.Page("screens/queue.py", title="Queue", icon=":material/list:"),
]
signed_in = account is not None or views.auth_mode(review_settings) == "single"
if signed_in and (account is None or account.is_admin):
    pages += [st.Page("screens/agreement.py", title="Agreement", icon=":material/handshake:"),
              st.Page("screens/audit.py", title="Audit", icon=":material/flag:")]
if account is not None and account.is_admin and views.auth_mode(review_settings) != "single":
    pages.append(st.Page("screens/adjudicate.py", title="Adjudicate", icon=":material/gavel:"))
navigation = st.navigation(pages)
st.sidebar.caption(f"Store: `{views.store().path}`")
navigation.run()
