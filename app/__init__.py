"""Entry points: the `mnr` CLI, the Streamlit review UI (`review`), the Mine and Refine loop (`loop`)."""
