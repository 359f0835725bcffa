"""One posterior over each pair's true grade from every signal the audit has, as arrays.

    posterior = combined_posterior(labels, labeler_probs, engagement_likelihood, label_noise)

The three signals are taken as independent given the true grade t: the labeler's P(t | text), the
engagement likelihood P(engagement | t), and the label, through P(t | label) (the audit's fitted
label-noise matrix). By Bayes' rule
    P(t | text, engagement, label) ∝ P(t | text) · P(engagement | t) · P(t | label) / P(t),
with P(t) the labeler's mean probability over the pairs.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

_TINY = 1e-12


def combined_posterior(labels: np.ndarray, labeler_probs: np.ndarray, engagement_likelihood: np.ndarray,
                       label_noise: np.ndarray) -> np.ndarray:
    """Shape (n_pairs, n_grades): P(true grade | label, text, engagement).

    labels: ints, shape (n_pairs,), the current label's grade. labeler_probs: shape (n_pairs, n_grades),
    P(grade | text), calibrated (a fine-tuned LLM's stored probabilities, or a text baseline's).
    engagement_likelihood: shape (n_pairs, n_grades), proportional to P(engagement | grade) (rows of
    a flat-prior posterior will do; uniform rows where a pair has no engagement).
    label_noise: shape (n_grades, n_grades), P(true grade | label).
    """
    base = np.maximum(labeler_probs.mean(axis=0), _TINY)
    joint = labeler_probs * engagement_likelihood * label_noise[labels] / base
    return joint / np.maximum(joint.sum(axis=1, keepdims=True), _TINY)


def labeler_matrix(probs_json: pd.Series, grade_of: dict[str, int], n_grades: int) -> np.ndarray:
    """Shape (n_pairs, n_grades) from stored label probabilities ({label: p} JSON per row; NaN rows
    for missing JSON), renormalised over the scheme's grades."""
    matrix = np.zeros((len(probs_json), n_grades))
    for row, text in enumerate(probs_json):
        if isinstance(text, str):
            for name, p in json.loads(text).items():
                if name in grade_of:
                    matrix[row, grade_of[name]] = float(p)
    total = matrix.sum(axis=1, keepdims=True)
    return np.where(total > 0, matrix / np.maximum(total, _TINY), np.nan)


def confident_relabels(posterior: np.ndarray, *, min_confidence: float = 0.9) -> np.ndarray:
    """Shape (n_pairs,): the grade a relabel may write without a person, or -1 where a person decides.

    posterior: shape (n_pairs, n_grades), e.g. `combined_posterior` of flagged pairs. A pair gets its most
    likely grade only when that grade's probability is at least `min_confidence`: a calibrated posterior
    then writes a wrong grade on at most 1 - min_confidence of the pairs it relabels, and the rest wait in
    the review queue instead of trading one error for another.
    """
    if not 0.5 < min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in (0.5, 1], got {min_confidence}")
    best = posterior.argmax(axis=1)
    sure = posterior[np.arange(len(posterior)), best] >= min_confidence
    return np.where(sure, best, -1)
