"""Entry points: the `mnr` CLI, the Streamlit review UI, the end-to-end pipeline."""
