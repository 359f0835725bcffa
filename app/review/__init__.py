"""The review UI: annotators decide the pairs where a human label changes the most.

Data logic lives in plain modules (`queue`, `item`, `decisions`, `agreement`, `audit`); the
Streamlit script (`ui.py`, `pages/`, `views.py`) only draws it.
"""
