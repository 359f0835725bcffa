"""The oracle bound of the label-error benchmarks: Bayes' rule with what only the simulator knows.

It knows each impression's true examination probability (the simulator's `true_examination`), each
grade's true attractiveness and conversion rates, the spread of appeal within a grade, and how the
labels were corrupted. It still sees only a pair's counts, so it is the best any audit of that log
could do with clicks, add-to-carts and purchases: the bound the audit's F1 is compared with.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit, gammaln, logit, logsumexp

from auditor.simulate import SimulationParams, grade_table

# Gauss-Hermite nodes for the within-grade appeal spread, N(0, pair_noise^2) on the logit scale.
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(24)
_LOG_WEIGHTS = np.log(_WEIGHTS / _WEIGHTS.sum())


def corruption_matrix(max_grade: int, rate: float, neighbour_share: float) -> np.ndarray:
    """Shape (n_grades, n_grades): P(noisy label = l | true grade t) under `corrupt_grades` (rows t)."""
    n = max_grade + 1
    matrix = np.zeros((n, n))
    for t in range(n):
        neighbours = [g for g in (t - 1, t + 1) if 0 <= g <= max_grade]
        far = [g for g in range(n) if abs(g - t) >= 2]
        matrix[t, t] = 1 - rate
        near_share = neighbour_share if far else 1.0
        for g in neighbours:
            matrix[t, g] += rate * near_share / len(neighbours)
        for g in far:
            matrix[t, g] += rate * (1 - near_share) / len(far)
    return matrix


def oracle_wrong_probability(labels: np.ndarray, exposure: np.ndarray, clicks: np.ndarray, carts: np.ndarray,
                             buys: np.ndarray, params: SimulationParams, max_grade: int, grade_prior: np.ndarray,
                             corruption: np.ndarray) -> np.ndarray:
    """Shape (n_pairs,): P(the label is wrong | counts), by Bayes' rule with the simulator's truth.

    labels: the noisy grades, shape (n_pairs,). exposure: the sum of true examination probabilities of
    the pair's impressions; clicks, carts, buys: its counts. Clicks are Poisson with mean
    exposure * attractiveness (a sum of independent Bernoullis with small probabilities), the
    attractiveness integrated over the grade's appeal spread; conversions are binomial.
    grade_prior: shape (n_grades,), P(true grade). corruption: corruption_matrix(...).
    """
    rates = grade_table(params, max_grade)
    logits = logit(rates["attractiveness"].to_numpy())[:, None] + params.pair_noise * _NODES[None, :]
    attractiveness = expit(logits)  # (n_grades, n_nodes)
    mean = exposure[:, None, None] * attractiveness[None, :, :]
    c = clicks[:, None, None]
    clicks_ll = logsumexp(c * np.log(np.maximum(mean, 1e-300)) - mean - gammaln(c + 1) + _LOG_WEIGHTS[None, None, :],
                          axis=2)
    atc, buy = rates["add_to_cart_rate"].to_numpy(), rates["purchase_rate"].to_numpy()
    conversion_ll = (carts[:, None] * np.log(atc) + (clicks - carts)[:, None] * np.log1p(-atc)
                     + buys[:, None] * np.log(buy) + (carts - buys)[:, None] * np.log1p(-buy))
    log_joint = clicks_ll + conversion_ll + np.log(grade_prior)[None, :] + np.log(corruption[:, labels].T)
    posterior = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
    return 1.0 - posterior[np.arange(len(labels)), labels]
