"""From label-token log-probabilities to label probabilities.

Every backend scores one forward step: the logits at the position right after the prompt,
restricted to the first token of each answer option. Those tokens must be distinct.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
from scipy.special import expit

from labelstore.errors import MnrError


class LabelTokenError(MnrError):
    """The answer options cannot be told apart by their first token in this tokenizer."""


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def label_token_ids(tokenizer: Encoder, options: list[str]) -> list[int]:
    """The first token id of each option, in order.

    Parameters
    ----------
    tokenizer : object with `encode(text, add_special_tokens=False) -> list[int]`
    options : answer strings, one per label (e.g. `Policy.answer_options()`)

    Returns
    -------
    list[int] of length len(options), all distinct. Raises `LabelTokenError` when an option
    encodes to nothing or two options share a first token.
    """
    ids: list[int] = []
    for option in options:
        tokens = tokenizer.encode(option, add_special_tokens=False)
        if not tokens:
            raise LabelTokenError(f"answer option {option!r} encodes to no tokens")
        ids.append(int(tokens[0]))
    seen: dict[int, str] = {}
    for option, token in zip(options, ids):
        if token in seen:
            raise LabelTokenError(
                f"answer options {seen[token]!r} and {option!r} share their first token (id {token}); "
                "rename a label or use a tokenizer that separates them"
            )
        seen[token] = option
    return ids


def probs_from_logprobs(logprobs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Normalised label probabilities from label-token log-probabilities.

    Parameters
    ----------
    logprobs : np.ndarray, shape (n_pairs, n_labels)
        Log-probabilities (or logits: any per-row additive constant cancels) of each label's
        first token, columns in scheme order. -inf marks a label the engine could not emit.
    temperature : float
        Calibration temperature T > 0; the result is softmax(logprobs / T) per row.

    Returns
    -------
    np.ndarray, shape (n_pairs, n_labels), float64, each row summing to 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    scaled = np.asarray(logprobs, dtype=np.float64) / temperature
    if scaled.ndim != 2:
        raise ValueError(f"logprobs must have shape (n_pairs, n_labels), not {scaled.shape}")
    if scaled.shape[0] and not np.isfinite(scaled.max(axis=1)).all():
        raise ValueError("a row of label logprobs has no finite value")
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=1, keepdims=True)


FLAG_LOGPROB_FLOOR = -100.0


def flag_probs_from_logprobs(logprobs: np.ndarray, temperatures: list[float]) -> np.ndarray:
    """P(flag applies) = sigmoid((lp_yes - lp_no) / T) per flag.

    Parameters
    ----------
    logprobs : shape (n_pairs, n_flags, 2), column 0 the yes token, column 1 the no token.
    temperatures : one T > 0 per flag.

    Returns
    -------
    np.ndarray, shape (n_pairs, n_flags), float64 in [0, 1].
    """
    scores = np.asarray(logprobs, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[2] != 2 or scores.shape[1] != len(temperatures):
        raise ValueError(f"flag logprobs must have shape (n_pairs, {len(temperatures)}, 2), not {scores.shape}")
    scale = np.asarray(temperatures, dtype=np.float64)
    if (scale <= 0).any():
        raise ValueError(f"flag temperatures must be > 0, not {temperatures}")
    # an engine may return no log-probability (-inf) for a token: floor both, so two missing ones give 0.5, not NaN
    scores = np.maximum(scores, FLAG_LOGPROB_FLOOR)
    return expit((scores[:, :, 0] - scores[:, :, 1]) / scale)
