"""What a labeler backend does: one scoring pass per prompt, and short free text for data generation."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Scores prompts on the first token of each answer option."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` in the served model's tokenizer."""
        ...

    def label_logprobs(self, prompts: list[str], token_ids: list[int], options: list[str]) -> np.ndarray:
        """Log-probabilities of `token_ids` at the position after each prompt.

        Returns shape (len(prompts), len(token_ids)); rows need not be normalised.
        `options` are the full answer strings (for structured-output constraints).
        """
        ...

    def generate(self, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """One completion per prompt, cut before its first newline (greedy when `temperature` is 0).

        Used for synthetic queries (`app.synthetic_queries`), not for labels.
        """
        ...

    def close(self) -> None:
        """Release the engine or connections."""
        ...


STOP = "\n"  # completions end at the first newline: one line of text per prompt


def first_line(text: str) -> str:
    """`text` up to (not including) its first newline, as a server stopping at STOP returns it."""
    return text.split(STOP, 1)[0]
