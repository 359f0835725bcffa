"""What a labeler backend does: one scoring pass per prompt, no free text."""
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

    def close(self) -> None:
        """Release the engine or connections."""
        ...
