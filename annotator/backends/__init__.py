"""Labeler backends. Each turns prompts into label-token log-probabilities (see `base.Backend`)."""
from __future__ import annotations

BACKENDS = ("vllm", "openai", "transformers")
