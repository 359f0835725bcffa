"""The two statistical fits of the audit, vectorised over arrays (numpy/scipy), run on aggregated counts.

Both read small tables the SQL has already reduced the event log to (one row per (pair, position)
and one row per pair), never the events themselves.

- `fit_position_curve`: the position-based click model, clicks[pair, pos] ~ impressions[pair, pos]
  * examination[pos] * attractiveness[pair], fitted by alternating closed-form steps.
- `fit_grade_model`: what engagement looks like for each grade and, per pair, the posterior over the
  pair's true grade, by EM over the latent true grade. See its docstring for the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import betaln, gammaln, logsumexp
from sklearn.isotonic import isotonic_regression

_TINY = 1e-9
_MIN_RHO = 1e-4
START_VARIATION = 0.5
# fixed-point rounds of the saturating weights of `_beta_binomial_rho`
RHO_ROUNDS = 3
# a grade with less posterior mass than this many pairs takes the pooled click spread
MIN_SHAPE_PAIRS = 20.0
# Products of one grade differ in appeal by at least this coefficient of variation (price, image, brand).
MIN_PAIR_VARIATION = 0.15
# The prior over true grades is the labels' distribution until this many pairs' engagement says otherwise.
PRIOR_PAIRS = 200.0


def fit_position_curve(pair_index: np.ndarray, position: np.ndarray, impressions: np.ndarray, clicks: np.ndarray,
                       iterations: int = 50, tolerance: float = 1e-4) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit examination per position and attractiveness per pair from aggregated counts.

    pair_index: int array, shape (n_cells,), 0..n_pairs-1: the pair of each (pair, position) cell.
    position: int array, shape (n_cells,), 1-based. impressions, clicks: counts per cell.
    Alternates attractiveness given examination and examination given attractiveness, with
    examination normalised to 1 at the first position, until no position moves by more than
    `tolerance` (relative). A pair shown at several positions separates the two factors.
    Returns (positions, examination, mean_attractiveness): the sorted distinct positions, the
    examination at each, and the impression-weighted mean attractiveness (clicks / examined impressions).
    """
    positions, pos_index = np.unique(position, return_inverse=True)
    n_pairs = int(pair_index.max()) + 1 if len(pair_index) else 0
    impressions = impressions.astype(float)
    clicks = clicks.astype(float)
    pair_clicks = np.bincount(pair_index, clicks, n_pairs)
    pos_clicks = np.bincount(pos_index, clicks, len(positions))
    examination = pos_clicks / np.maximum(np.bincount(pos_index, impressions, len(positions)), 1.0)
    examination = examination / max(examination[0], _TINY)
    for _ in range(iterations):
        attractiveness = pair_clicks / np.maximum(np.bincount(pair_index, impressions * examination[pos_index], n_pairs), _TINY)
        raw = pos_clicks / np.maximum(np.bincount(pos_index, impressions * attractiveness[pair_index], len(positions)), _TINY)
        updated = raw / max(raw[0], _TINY)
        change = np.max(np.abs(updated - examination) / np.maximum(examination, _TINY)) if len(updated) else 0.0
        examination = updated
        if change < tolerance:
            break
    mean_attractiveness = clicks.sum() / max(float((impressions * examination[pos_index]).sum()), _TINY)
    return positions, examination, float(mean_attractiveness)


@dataclass(frozen=True)
class Spread:
    """How much pairs of one grade differ. click_shape: shape (n_grades,), each grade's negative-binomial
    shape of clicks (1 / squared coefficient of variation of attractiveness); cart_rho, buy_rho: the
    beta-binomial intra-pair correlation of add-to-cart per click and purchase per add-to-cart."""

    click_shape: np.ndarray
    cart_rho: float = 0.0
    buy_rho: float = 0.0


@dataclass
class GradeModel:
    """The fitted engagement model of each grade, and each pair's posterior over its true grade.

    grades: shape (n_grades,), 0..max_grade. coec, add_to_cart_rate, purchase_rate: shape (n_grades,),
        non-decreasing in grade: a grade's COEC and its conversion rates (add-to-cart per click,
        purchase per add-to-cart). label_noise: shape (n_grades, n_grades), P(true grade | label).
    likelihood_posterior: shape (n_pairs, n_grades), P(grade | engagement) under a flat prior: the
        engagement evidence alone, to combine with other evidence (e.g. a labeler's probabilities).
    posterior: shape (n_pairs, n_grades), P(true grade | engagement, label): the likelihood times the
        label's row of label_noise (a flat prior for unlabelled pairs).
    log_likelihood: shape (n_pairs, n_grades), after dividing by the dispersion.
    spread: how much pairs of one grade differ (fitted, or from pair_variation).
    """

    grades: np.ndarray
    coec: np.ndarray
    add_to_cart_rate: np.ndarray
    purchase_rate: np.ndarray
    label_noise: np.ndarray
    log_likelihood: np.ndarray
    likelihood_posterior: np.ndarray
    posterior: np.ndarray
    pairs_per_grade: np.ndarray
    spread: Spread


def _monotone(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return isotonic_regression(values, sample_weight=np.maximum(weights, _TINY), increasing=True)


def _log_likelihood(clicks: np.ndarray, expected: np.ndarray, carts: np.ndarray, buys: np.ndarray,
                    coec: np.ndarray, atc: np.ndarray, buy: np.ndarray, spread: Spread, dispersion: float,
                    trials: np.ndarray) -> np.ndarray:
    """Shape (n_pairs, n_grades): log P(clicks, carts, buys | grade), up to terms equal across grades.

    Clicks: negative binomial with mean expected_clicks * coec[grade] and shape spread.click_shape[grade]
    (a pair's attractiveness varies around its grade's by a Gamma factor of variance 1 / shape), so
    the evidence of one pair saturates however much traffic it gets. Add-to-carts given `trials` (every
    click, also those on impressions that are not click evidence) and purchases given
    add-to-carts: beta-binomial with the grade's rate and intra-pair correlation spread.cart_rho /
    spread.buy_rho (binomial at 0).
    """
    coec = np.maximum(coec, _TINY)
    expected = np.maximum(expected, _TINY)
    c = clicks[:, None]
    k = spread.click_shape[None, :]
    mean = expected[:, None] * coec[None, :]
    clicks_ll = _negative_binomial_log_pmf(c, mean, k)
    conversion_ll = (_conversion_log_likelihood(carts, trials, atc, spread.cart_rho)
                     + _conversion_log_likelihood(buys, carts, buy, spread.buy_rho))
    return (clicks_ll + conversion_ll) / dispersion


def _negative_binomial_log_pmf(clicks: np.ndarray, mean: np.ndarray, shape: np.ndarray | float) -> np.ndarray:
    """log NegBin(clicks | mean, shape) without the log(clicks!) term (equal for every mean and shape); broadcasts."""
    return (gammaln(clicks + shape) - gammaln(shape) + shape * np.log(shape / (shape + mean))
            + clicks * np.log(mean / (shape + mean)))


def _conversion_log_likelihood(successes: np.ndarray, trials: np.ndarray, rate: np.ndarray, rho: float) -> np.ndarray:
    """Shape (n_pairs, n_grades): log P(successes | trials, rate[grade]) without the binomial coefficient;
    beta-binomial with intra-pair correlation `rho` (binomial when rho is 0)."""
    rate = np.clip(rate, 1e-6, 1 - 1e-6)[None, :]
    x, n = successes[:, None], trials[:, None]
    if rho <= _MIN_RHO:
        return x * np.log(rate) + (n - x) * np.log1p(-rate)
    alpha, beta = rate * (1 - rho) / rho, (1 - rate) * (1 - rho) / rho
    return betaln(x + alpha, n - x + beta) - betaln(alpha, beta)


def _negative_binomial_shapes(clicks: np.ndarray, expected: np.ndarray, coec: np.ndarray,
                              responsibility: np.ndarray, min_variation: float = MIN_PAIR_VARIATION) -> np.ndarray:
    """Maximum-likelihood estimates of each grade's Gamma shape k, shape (n_grades,): clicks ~ negative binomial
    with mean expected_clicks x coec[grade] and shape k, each pair weighted by its posterior on the grade; 1 / k
    is kept within [min_variation^2, 4]. A grade with under `MIN_SHAPE_PAIRS` pairs of posterior mass takes the
    estimate of all pairs pooled.

    Maximum likelihood, not moments: in the moment estimate (Var(clicks) = mean + mean^2 / k summed over pairs)
    a pair weighs with the square of its traffic, so under Zipf traffic the few pairs of the head queries set it.
    That read a within-grade coefficient of variation of 0.35 as 0.15, no pair's evidence saturated, and the EM
    split one grade into two (44% of a log's labels flagged where 10% were wrong; `bench.bench_audit_stress`).

    The floor matters: where Poisson noise hides the spread (few clicks a pair), the estimate
    drops to 0, no pair's weight saturates, and a few heavily shown mislabelled pairs, each with a
    sliver of a grade's posterior, set that grade's profile."""
    mean = np.maximum(expected[:, None] * coec[None, :], _TINY)
    bounds = (2.0 * np.log(max(min_variation, 1e-3)), np.log(4.0))
    own = responsibility.sum(axis=0) >= MIN_SHAPE_PAIRS
    pooled = _shape_inverse(clicks, mean, responsibility, bounds) if not own.all() else np.nan
    inverse = np.array([_shape_inverse(clicks, mean[:, [g]], responsibility[:, [g]], bounds) if own[g] else pooled
                        for g in range(mean.shape[1])])
    return 1.0 / np.clip(inverse, min_variation ** 2, 4.0)


def _shape_inverse(clicks: np.ndarray, mean: np.ndarray, weight: np.ndarray, log_bounds: tuple[float, float]) -> float:
    """1 / k maximising sum(weight x log NegBin(clicks | mean, k)) over the columns of ``mean`` / ``weight``
    (shape (n_pairs, m)), searched on log(1 / k) within ``log_bounds``; pairs of negligible weight are left out."""
    used = weight > 1e-4
    c, m, w = np.broadcast_to(clicks[:, None], mean.shape)[used], mean[used], weight[used]

    def negative_log_likelihood(log_inverse: float) -> float:
        k = np.exp(-log_inverse)
        return -float(np.sum(w * _negative_binomial_log_pmf(c, m, k)))

    if not used.any():
        return float(np.exp(log_bounds[0]))
    return float(np.exp(minimize_scalar(negative_log_likelihood, bounds=log_bounds, method="bounded",
                                        options={"xatol": 0.02}).x))


def _beta_binomial_rho(successes: np.ndarray, trials: np.ndarray, rate: np.ndarray, start_rho: float = 0.0) -> float:
    """Moment estimate of the intra-pair correlation of a rate, from Var(x) = n p (1 - p) (1 + (n - 1) rho)
    with p each pair's expected rate (shape (n_pairs,)); pairs with fewer than 2 trials say nothing.
    Kept within [0, 0.5]. A pair's weight saturates with its trials (1 / (1 + (n - 1) rho)^2, about the inverse
    variance of its term; `RHO_ROUNDS` rounds from ``start_rho``), so the busiest pairs do not decide it, as
    they would weighted by n^2 (see `_negative_binomial_shapes`)."""
    used = trials >= 2
    n, x, p = trials[used], successes[used], np.clip(rate[used], 1e-6, 1 - 1e-6)
    rho = start_rho
    for _ in range(RHO_ROUNDS):
        weight = 1.0 / (1.0 + (n - 1) * rho) ** 2
        excess = float(np.sum(weight * ((x - n * p) ** 2 - n * p * (1 - p))))
        scale = float(np.sum(weight * n * (n - 1) * p * (1 - p)))
        rho = float(np.clip(excess / scale, 0.0, 0.5)) if scale > 0 else 0.0
    return rho


def fit_grade_model(clicks: np.ndarray, expected_clicks: np.ndarray, add_to_carts: np.ndarray, purchases: np.ndarray,
                    label_grade: np.ndarray, n_grades: int, label_trust: float = 0.8, pair_variation: float = 0.3,
                    dispersion: float = 1.0, iterations: int = 30, min_pairs_per_grade: int = 5,
                    tolerance: float = 1e-3, max_fit_pairs: int | None = None, seed: int = 0,
                    all_clicks: np.ndarray | None = None, min_pair_variation: float = MIN_PAIR_VARIATION) -> GradeModel:
    """EM over each pair's latent true grade, from per-pair counts.

    clicks, expected_clicks, add_to_carts, purchases: float arrays, shape (n_pairs,); expected_clicks
        are the clicks an average pair gets at the positions this pair was shown (the position curve),
        and clicks the clicks on those impressions.
    all_clicks: shape (n_pairs,), every click of the pair, the trials of add-to-cart (None: clicks);
        more than clicks when some impressions are not click evidence (below a click in a session,
        under a sequential click model).
    label_grade: shape (n_pairs,), the current label's grade, or -1 for unlabelled pairs.
    The model: true grade t ~ label_noise[label, t]; clicks ~ NegBin(mean expected_clicks * coec[t],
    shape 1 / pair_variation^2, or each grade's estimated from the log (maximum likelihood) when pair_variation <= 0,
    with a coefficient of variation of at least min_pair_variation);
    add-to-carts ~ BetaBin(clicks, atc[t], rho) and purchases ~ BetaBin(add-to-carts, buy[t], rho), rho
    estimated by moments (0, binomial, with a fixed pair_variation);
    log-likelihoods divided by `dispersion` (1: trust the model). EM starts from the labels
    (label_noise = label_trust on the diagonal), and each M-step pools the counts of every grade
    weighted by the posterior, then makes coec, atc and buy non-decreasing in grade (isotonic
    regression), so a few wrong labels cannot invert a grade's profile. Grades with fewer than
    `min_pairs_per_grade` labelled pairs borrow from their neighbours through the monotone fit.
    Stops when no parameter (profiles, label noise) moves by more than `tolerance` (relative).
    With more than `max_fit_pairs` pairs, the EM runs on a random sample (seeded) of that many; a
    final E-step with the fitted parameters gives every pair its posterior.
    """
    clicks, expected = clicks.astype(float), expected_clicks.astype(float)
    carts, buys = add_to_carts.astype(float), purchases.astype(float)
    trials = clicks if all_clicks is None else all_clicks.astype(float)
    labels = label_grade.astype(int)
    # row n_grades of the prior is the flat prior of unlabelled pairs
    label_row = np.where(labels >= 0, labels, n_grades)
    pairs_per_grade = np.bincount(label_row, minlength=n_grades + 1)[:n_grades]
    fit = slice(None)
    if max_fit_pairs is not None and len(clicks) > max_fit_pairs:
        fit = np.sort(np.random.default_rng(seed).choice(len(clicks), max_fit_pairs, replace=False))
    params = _fit_parameters(clicks[fit], expected[fit], carts[fit], buys[fit], label_row[fit], n_grades,
                             label_trust, pair_variation, dispersion, iterations, min_pairs_per_grade, tolerance,
                             trials[fit], min_pair_variation)
    coec, atc, buy, spread, noise, grade_prior = params
    log_lik = _log_likelihood(clicks, expected, carts, buys, coec, atc, buy, spread, dispersion, trials)
    log_prior = np.log(np.maximum(_prior_rows(noise, grade_prior), _TINY))
    return GradeModel(grades=np.arange(n_grades), coec=coec, add_to_cart_rate=atc, purchase_rate=buy,
                      label_noise=noise, log_likelihood=log_lik, likelihood_posterior=_normalise(log_lik),
                      posterior=_normalise(log_lik + log_prior[label_row]), pairs_per_grade=pairs_per_grade,
                      spread=spread)


def _fit_parameters(clicks: np.ndarray, expected: np.ndarray, carts: np.ndarray, buys: np.ndarray,
                    label_row: np.ndarray, n_grades: int, label_trust: float, pair_variation: float,
                    dispersion: float, iterations: int, min_pairs_per_grade: int,
                    tolerance: float, trials: np.ndarray,
                    min_pair_variation: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, Spread, np.ndarray, np.ndarray]:
    """The EM loop of `fit_grade_model` (trials: every click, add-to-cart's trials); returns
    (coec, atc, buy, spread, label_noise, grade_prior).

    The labels are modelled the way they are made: a pair's true grade t has prior grade_prior[t] among
    the pairs in the log, and a label l with P(l | t) = confusion[t, l]. The confusion is a property of
    the labelling, the same for every pair; the prior is not: a ranker shows mostly good products, so
    among pairs with traffic a rare label (irrelevant) can hold more mislabelled good products than
    truly irrelevant ones. P(true | label) = label_noise follows from both by Bayes' rule.
    """
    estimate_variation = pair_variation <= 0
    # An estimated spread starts wide (coefficient of variation 0.5): the first M-step then saturates each
    # pair's weight, so a few heavily shown mislabelled pairs cannot set the starting profiles.
    spread = Spread(click_shape=np.full(n_grades, 1.0 / (START_VARIATION if estimate_variation else pair_variation) ** 2))
    pairs_per_grade = np.bincount(label_row, minlength=n_grades + 1)[:n_grades]
    off = (1.0 - label_trust) / max(n_grades - 1, 1)
    start = np.full((n_grades, n_grades), off) + np.eye(n_grades) * (label_trust - off)
    confusion = start
    label_share = (pairs_per_grade + 1.0) / (pairs_per_grade.sum() + n_grades)
    grade_prior = label_share
    noise = _label_noise(grade_prior, confusion)
    responsibility = _prior_rows(noise, grade_prior)[label_row]
    parameters = np.zeros(0)
    trusted = (pairs_per_grade >= min_pairs_per_grade).astype(float)
    overall_atc = carts.sum() / max(trials.sum(), 1.0)
    overall_buy = buys.sum() / max(carts.sum(), 1.0)
    coec = np.full(n_grades, clicks.sum() / max(expected.sum(), _TINY))
    atc, buy = np.full(n_grades, overall_atc), np.full(n_grades, overall_buy)
    for _ in range(iterations):
        # Each pair's weight saturates (the negative-binomial and beta-binomial maximum-likelihood means),
        # so a few pairs with huge traffic, such as a mislabelled product a fixed ranker keeps on top,
        # cannot set a grade's profile.
        click_sum, expected_sum = _saturated_sums(clicks, expected, coec / spread.click_shape, responsibility)
        cart_sum, cart_trials = _saturated_sums(carts, trials, np.full(n_grades, spread.cart_rho), responsibility)
        buy_sum, buy_trials = _saturated_sums(buys, carts, np.full(n_grades, spread.buy_rho), responsibility)
        coec = _monotone(np.maximum(click_sum, _TINY) / np.maximum(expected_sum, _TINY), expected_sum * trusted)
        atc = _monotone((cart_sum + 10 * overall_atc) / (cart_trials + 10), (cart_trials + 10) * trusted)
        buy = _monotone((buy_sum + 10 * overall_buy) / (buy_trials + 10), (buy_trials + 10) * trusted)
        if estimate_variation:
            spread = Spread(click_shape=_negative_binomial_shapes(clicks, expected, coec, responsibility,
                                                                  min_pair_variation),
                            cart_rho=_beta_binomial_rho(carts, trials, responsibility @ atc, spread.cart_rho),
                            buy_rho=_beta_binomial_rho(buys, carts, responsibility @ buy, spread.buy_rho))
        log_lik = _log_likelihood(clicks, expected, carts, buys, coec, atc, buy, spread, dispersion, trials)
        log_prior = np.log(np.maximum(_prior_rows(noise, grade_prior), _TINY))
        responsibility = _normalise(log_lik + log_prior[label_row])
        mass = responsibility.sum(axis=0)
        grade_prior = (mass + PRIOR_PAIRS * label_share) / (mass.sum() + PRIOR_PAIRS)
        # P(label | true): the pooled posteriors of each label's pairs, smoothed towards the start
        counts = np.stack([np.bincount(label_row, responsibility[:, t], n_grades + 1)[:n_grades]
                           for t in range(n_grades)])
        confusion = (counts + 20 * start) / (counts.sum(axis=1, keepdims=True) + 20)
        noise = _label_noise(grade_prior, confusion)
        updated = np.concatenate([coec, atc, buy, noise.ravel()])
        converged = len(parameters) and np.max(np.abs(updated - parameters) / np.maximum(np.abs(parameters), 1e-2)) < tolerance
        parameters = updated
        if converged:
            break
    return coec, atc, buy, spread, noise, grade_prior


def _label_noise(grade_prior: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """Shape (n_grades, n_grades): P(true grade | label) from the prior over true grades, shape
    (n_grades,), and confusion[true, label] = P(label | true), by Bayes' rule."""
    joint = grade_prior[:, None] * confusion
    return (joint / np.maximum(joint.sum(axis=0, keepdims=True), _TINY)).T


def _saturated_sums(successes: np.ndarray, exposure: np.ndarray, saturation: np.ndarray,
                    responsibility: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per grade, shape (n_grades,) each: sum_i r_ig x_i / (1 + e_i s_g) and sum_i r_ig e_i / (1 + e_i s_g).

    successes x, exposure e: shape (n_pairs,); saturation s: shape (n_grades,), coec / shape for
    negative-binomial clicks over expected clicks (e = expected clicks), rho for beta-binomial
    conversions (e = trials, approximately). Their ratio is the grade's mean with each pair weighted
    e / (1 + e s): proportional to its exposure while small, at most 1 / s however large.
    """
    weight = responsibility / (1.0 + exposure[:, None] * saturation[None, :])
    return successes @ weight, exposure @ weight


def _prior_rows(noise: np.ndarray, grade_prior: np.ndarray) -> np.ndarray:
    """Shape (n_grades + 1, n_grades): P(true grade | label) per label, then the prior of unlabelled pairs."""
    return np.vstack([noise, grade_prior])


def _normalise(log_weights: np.ndarray) -> np.ndarray:
    """Row-wise softmax of log weights, shape (n, k)."""
    weights = np.exp(log_weights - log_weights.max(axis=1, keepdims=True, initial=-np.inf))
    return weights / weights.sum(axis=1, keepdims=True)


# Exponents the audit's examination curve is raised to for a query whose shoppers look deeper (< 1) or less
# deep (> 1) than the log's average; event_counts.sql sums expected clicks at each but 1 (its own column).
PATIENCE_EXPONENTS = np.array([0.3, 0.5, 0.72, 1.0, 1.4, 2.0, 3.3])
# Spreads (sd of the log exponent across queries) tried by the empirical-Bayes fit of `fit_query_patience`.
PATIENCE_SPREADS = np.array([0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25, 1.5])


@dataclass(frozen=True)
class QueryPatience:
    """How far each query's shoppers look, as `fit_query_patience` fitted it.

    spread: the fitted sd of log(exponent) across queries; 0 when the log shows no variation (every exponent 1).
    exponent: shape (n_queries,), each query's posterior mean exponent of the examination curve.
    expected_clicks: shape (n_pairs,), each pair's expected clicks under its query's exponent posterior
        (unchanged for pairs with no query).
    log_evidence: shape (len(spreads),), the marginal log-likelihood of each spread tried.
    """

    spread: float
    exponent: np.ndarray
    expected_clicks: np.ndarray
    log_evidence: np.ndarray


def fit_query_patience(query_index: np.ndarray, clicks: np.ndarray, expected_by_exponent: np.ndarray,
                       label_grade: np.ndarray, model: GradeModel, *, max_spread: float = 1.0,
                       dispersion: float = 1.0) -> QueryPatience:
    """Per query, an exponent of the examination curve, fitted by empirical Bayes.

    query_index: int, shape (n_pairs,), 0..n_queries-1, or -1 where a pair's query is unknown (left as it is).
    clicks: shape (n_pairs,), the evidence clicks. expected_by_exponent: shape (n_pairs, len(PATIENCE_EXPONENTS)),
        the clicks an average pair gets at the positions this pair was shown when the curve's examination is
        raised to each exponent (column 1.0: the curve itself). label_grade: shape (n_pairs,), -1 unlabelled.
    model: the grade model fitted with the curve as it is (coec, click spread, label noise).

    The model: query q's shoppers examine position k with examination(k)^g_q (g_q < 1: deeper than the log's
    average, as a position-based log with a flatter decay, or a DBN with a higher continue probability);
    log g_q ~ Normal(0, s^2) on the exponent grid; a pair's clicks ~ NegBin(expected(g_q) x coec[t], shape[t]),
    with its true grade t drawn from P(true | label) (flat for unlabelled pairs), as in `fit_grade_model`.
    s maximises the marginal likelihood over queries, among PATIENCE_SPREADS up to `max_spread`, and must beat
    s = 0 by half the log of the number of queries (BIC for one parameter): a log where every query is browsed
    alike gets s = 0 and nothing changes. Why: one position curve for all queries reads
    a query browsed deeper than average as holding better products, and flags its deeper labels as too low.
    """
    n_exponents = expected_by_exponent.shape[1]
    known = query_index >= 0
    n_queries = int(query_index.max()) + 1 if known.any() else 0
    spreads = PATIENCE_SPREADS[PATIENCE_SPREADS <= max_spread + 1e-12]
    centre = int(np.argmin(np.abs(PATIENCE_EXPONENTS - 1.0)))
    unchanged = QueryPatience(0.0, np.ones(n_queries), expected_by_exponent[:, centre].copy(), np.zeros(len(spreads)))
    if n_queries == 0 or len(spreads) <= 1:
        return unchanged
    n_grades = len(model.coec)
    prior = np.vstack([model.label_noise, np.full((1, n_grades), 1.0 / n_grades)])
    log_prior = np.log(np.maximum(prior, _TINY))[np.where(label_grade >= 0, label_grade, n_grades)[known]]
    c = clicks[known][:, None]
    per_query = np.zeros((n_queries, n_exponents))
    for j in range(n_exponents):
        mean = np.maximum(expected_by_exponent[known, j], _TINY)[:, None] * np.maximum(model.coec, _TINY)[None, :]
        pair_ll = _negative_binomial_log_pmf(c, mean, model.spread.click_shape[None, :]) / dispersion
        per_query[:, j] = np.bincount(query_index[known], logsumexp(pair_ll + log_prior, axis=1), n_queries)
    log_exponent = np.log(PATIENCE_EXPONENTS)
    evidence, posteriors = [], []
    for spread in spreads:
        weights = (np.eye(n_exponents)[centre] if spread == 0 else np.exp(-log_exponent ** 2 / (2 * spread ** 2)))
        log_weights = np.log(np.maximum(weights / weights.sum(), 1e-300))
        joint = per_query + log_weights[None, :]
        evidence.append(float(logsumexp(joint, axis=1).sum()))
        posteriors.append(_normalise(joint))
    best = int(np.argmax(evidence))
    # a spread must earn its parameter (BIC): where the curve barely depends on the exponent (a cascade log's
    # examination above the first click is about 1 everywhere) the evidence is flat and its maximum is noise
    if evidence[best] - evidence[0] < 0.5 * np.log(max(n_queries, 2)):
        best = 0
    if spreads[best] == 0:
        return QueryPatience(0.0, np.ones(n_queries), unchanged.expected_clicks, np.array(evidence))
    posterior = posteriors[best]
    expected = unchanged.expected_clicks
    expected[known] = np.sum(posterior[query_index[known]] * expected_by_exponent[known], axis=1)
    return QueryPatience(float(spreads[best]), posterior @ PATIENCE_EXPONENTS, expected, np.array(evidence))
