"""Temperature scaling (Guo et al. 2017): one scalar T fitted on dev so probabilities mean what they say.

The labeler's scores are label-token log-probabilities ``logits`` of shape (n, K) (any additive
constant per row is irrelevant). Calibrated probabilities are::

    p_k = exp(logits_k / T) / sum_j exp(logits_j / T)

T > 1 softens an over-confident labeler, T < 1 sharpens an under-confident one; the argmax,
and so accuracy, never changes. T is fitted by minimising the dev negative log-likelihood.
The adapter's ``meta.json`` stores it under ``"temperature"``; every backend applies it
with `apply_temperature`.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from labelstore.errors import MnrError

TEMPERATURE_BOUNDS = (0.05, 20.0)


class CalibrationError(MnrError):
    """Temperature fitting got inputs it cannot use."""


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(n, K) probabilities: softmax of ``logits / temperature`` over the last axis."""
    if not temperature > 0:
        raise CalibrationError(f"temperature must be positive, got {temperature}")
    return softmax(np.asarray(logits, dtype=float) / temperature, axis=-1)


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``y_true`` (n,) under ``softmax(logits / temperature)``."""
    log_probs = log_softmax(np.asarray(logits, dtype=float) / temperature, axis=-1)
    return float(-np.mean(log_probs[np.arange(len(y_true)), np.asarray(y_true, dtype=int)]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature in `TEMPERATURE_BOUNDS` that minimises the NLL of ``y_true`` (n,) given ``logits`` (n, K).

    Searches log T (bounded scalar minimisation) so that softening and sharpening are treated alike.
    """
    logits = np.asarray(logits, dtype=float)
    y_true = np.asarray(y_true)
    if logits.ndim != 2 or len(logits) == 0 or y_true.shape != (len(logits),):
        raise CalibrationError(f"need logits (n, K) and y_true (n,) with n > 0, got {logits.shape} and {y_true.shape}")
    if not np.all(np.isfinite(logits)):
        raise CalibrationError("logits must be finite (clip log-probabilities of impossible labels first)")
    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: nll(logits, y_true, float(np.exp(log_t))), bounds=(low, high),
                             method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(result.x))
    # the bounded search can stop on a plateau; never return something worse than T = 1
    return best if nll(logits, y_true, best) <= nll(logits, y_true, 1.0) else 1.0
