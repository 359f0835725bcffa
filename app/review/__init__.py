"""The review UI: annotators decide the pairs where a human label changes the most.

Data logic lives in plain modules (`queue`, `item`, `decisions`, `agreement`, `audit`); the
Streamlit scripts (`ui.py`, the pages in `screens/`, the shared state in `views.py`) only draw it.
"""
