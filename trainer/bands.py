"""Score bands: the similarity thresholds that separate a scheme's grades, and a calibrated P(grade >= g | score).

Fitted on held-out labelled pairs (their cosine similarity under a model and their grade), so that
thresholds for exact / substitute / complement can be set once per model and stored with it in the
registry (`trainer.registry.save_bands`).

- Threshold of the boundary "grade >= g": the score maximising TPR - FPR (Youden's J, sklearn
  `roc_curve`), which does not move with how many pairs each side has; forced non-decreasing in g.
- Calibration per boundary: isotonic regression of 1[grade >= g] on the score (sklearn), stored as its
  knots; probabilities are forced non-increasing in g (P(grade >= 2) <= P(grade >= 1)).
- Reports: per-grade quantiles, adjacent-grade ROC AUC, adjacent-grade overlap (the overlapping
  coefficient of the two score histograms: 0 = disjoint bands, 1 = identical), precision at each
  threshold, and its stability across query halves and across groups (e.g. head vs tail queries).

Functions take arrays: `scores` (n,) float, `grades` (n,) int, `query_ids` (n,); options are keyword-only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score, roc_curve

from labelstore.errors import MnrError
from trainer.data import is_held_out

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
REPEATED_HALVINGS = 20
OVERLAP_BINS = 30


class BandsError(MnrError):
    """Score bands cannot be fitted or applied (too few grades, mismatched arrays, a stored band is malformed)."""


@dataclass(frozen=True)
class ScoreBands:
    """Fitted bands of one model. `grades` and `names` ascend by grade; boundary i separates
    grade >= grades[i+1] from the grades below it."""

    grades: tuple[int, ...]
    names: tuple[str, ...]
    thresholds: tuple[float, ...]  # (len(grades) - 1,), non-decreasing
    knots: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]  # per boundary: isotonic (x, y)

    @property
    def boundaries(self) -> list[str]:
        """'partial>irrelevant'-style names, one per boundary (upper grade first)."""
        return [f"{self.names[i + 1]}>{self.names[i]}" for i in range(len(self.thresholds))]

    def prob_at_least(self, scores: np.ndarray) -> np.ndarray:
        """(n, len(grades) - 1): column i is the calibrated P(grade >= grades[i+1] | score)."""
        scores = np.asarray(scores, dtype=float)
        probs = np.column_stack([np.interp(scores, x, y) for x, y in self.knots])
        return np.minimum.accumulate(probs, axis=1)

    def expected_grade(self, scores: np.ndarray, *, normalise: bool = False) -> np.ndarray:
        """(n,) E[grade | score]; with `normalise`, rescaled to [0, 1] (lowest grade 0, top grade 1)."""
        steps = np.diff(np.asarray(self.grades, dtype=float))
        expected = self.grades[0] + self.prob_at_least(scores) @ steps
        if normalise:
            return (expected - self.grades[0]) / (self.grades[-1] - self.grades[0])
        return expected

    def assign(self, scores: np.ndarray) -> np.ndarray:
        """(n,) the grade each score falls in by the thresholds."""
        index = np.searchsorted(np.asarray(self.thresholds), np.asarray(scores, dtype=float), side="right")
        return np.asarray(self.grades)[index]

    def to_dict(self) -> dict:
        return {"grades": list(self.grades), "names": list(self.names), "thresholds": list(self.thresholds),
                "knots": [{"x": list(x), "y": list(y)} for x, y in self.knots]}

    @classmethod
    def from_dict(cls, data: dict) -> "ScoreBands":
        try:
            knots = tuple((tuple(map(float, k["x"])), tuple(map(float, k["y"]))) for k in data["knots"])
            bands = cls(tuple(map(int, data["grades"])), tuple(map(str, data["names"])),
                        tuple(map(float, data["thresholds"])), knots)
        except (KeyError, TypeError, ValueError) as exc:
            raise BandsError(f"stored score bands are malformed ({exc!r}); refit with mnr bands") from exc
        if len(bands.thresholds) != len(bands.grades) - 1 or len(bands.knots) != len(bands.thresholds):
            raise BandsError("stored score bands are malformed (thresholds, knots and grades disagree); refit with mnr bands")
        return bands


def _check(scores: np.ndarray, grades: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, grades = np.asarray(scores, dtype=float), np.asarray(grades).astype(int)
    if scores.shape != grades.shape or scores.ndim != 1:
        raise BandsError(f"scores {scores.shape} and grades {grades.shape} must be 1-d arrays of the same length")
    if not np.isfinite(scores).all():
        raise BandsError("scores contain NaN or infinite values")
    return scores, grades


def _grade_names(grades: np.ndarray, grade_values: Sequence[int] | None,
                 names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    values = sorted(grade_values) if grade_values is not None else sorted(set(grades.tolist()))
    if names is not None and len(names) != len(values):
        raise BandsError(f"{len(names)} names for {len(values)} grades")
    return values, list(names) if names is not None else [str(g) for g in values]


def fit_bands(scores: np.ndarray, grades: np.ndarray, *, grade_values: Sequence[int] | None = None,
              names: Sequence[str] | None = None) -> ScoreBands:
    """Fit thresholds and calibration on labelled pairs.

    scores: (n,) similarity of each pair; grades: (n,) its grade. grade_values / names: the scheme's
    grades ascending and their label names (default: the grades present, named by number). Every
    boundary needs pairs on both sides.
    """
    scores, grades = _check(scores, grades)
    values, labels = _grade_names(grades, grade_values, names)
    if len(values) < 2:
        raise BandsError(f"score bands need at least two grades, got {values}")
    thresholds, knots = [], []
    for i, upper in enumerate(values[1:], start=1):
        positive = grades >= upper
        if positive.all() or not positive.any():
            if positive.all():
                side = f"'{labels[i - 1]}'" + (" or below" if i > 1 else "")
            else:
                side = f"'{labels[i]}'" + (" or above" if i < len(labels) - 1 else "")
            raise BandsError(f"no pair labelled {side}: the boundary between '{labels[i - 1]}' and '{labels[i]}' needs "
                             f"pairs on both sides ({int(positive.sum())} of {len(grades)} are '{labels[i]}' or "
                             "above); label more pairs")
        fpr, tpr, cut = roc_curve(positive, scores)
        thresholds.append(float(cut[1:][np.argmax((tpr - fpr)[1:])]))  # cut[0] is +inf (nothing above)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, positive.astype(float))
        knots.append((tuple(map(float, iso.X_thresholds_)), tuple(map(float, iso.y_thresholds_))))
    thresholds = np.maximum.accumulate(thresholds).tolist()
    return ScoreBands(tuple(values), tuple(labels), tuple(thresholds), tuple(knots))


def grade_distributions(scores: np.ndarray, grades: np.ndarray, *, grade_values: Sequence[int] | None = None,
                        names: Sequence[str] | None = None,
                        quantiles: Sequence[float] = QUANTILES) -> dict[str, dict[str, float]]:
    """{name: {n, mean, std, p10, p25, ...}} of the scores of each grade present (quantile q -> 'p{100q}')."""
    scores, grades = _check(scores, grades)
    values, labels = _grade_names(grades, grade_values, names)
    out: dict[str, dict[str, float]] = {}
    for grade, name in zip(values, labels):
        own = scores[grades == grade]
        if len(own):
            out[name] = {"n": int(len(own)), "mean": float(own.mean()), "std": float(own.std()),
                         **{f"p{round(q * 100)}": float(v) for q, v in zip(quantiles, np.quantile(own, quantiles))}}
    return out


def _adjacent(grades: np.ndarray, grade_values, names):
    values, labels = _grade_names(grades, grade_values, names)
    for i in range(len(values) - 1, 0, -1):  # the top boundary first
        yield f"{labels[i]}>{labels[i - 1]}", values[i], values[i - 1]


def adjacent_aucs(scores: np.ndarray, grades: np.ndarray, *, grade_values: Sequence[int] | None = None,
                  names: Sequence[str] | None = None) -> dict[str, float]:
    """{'upper>lower': ROC AUC} for adjacent grades both present: P(an upper pair outscores a lower one)."""
    scores, grades = _check(scores, grades)
    out = {}
    for key, upper, lower in _adjacent(grades, grade_values, names):
        both = np.isin(grades, [upper, lower])
        if len(set(grades[both].tolist())) == 2:
            out[key] = float(roc_auc_score(grades[both] == upper, scores[both]))
    return out


def adjacent_overlap(scores: np.ndarray, grades: np.ndarray, *, grade_values: Sequence[int] | None = None,
                     names: Sequence[str] | None = None, bins: int = OVERLAP_BINS) -> dict[str, float]:
    """{'upper>lower': overlapping coefficient}: sum over `bins` equal bins of the pooled range of
    min(share of upper pairs, share of lower pairs) in the bin. 0: separate bands; 1: the same distribution."""
    scores, grades = _check(scores, grades)
    out = {}
    for key, upper, lower in _adjacent(grades, grade_values, names):
        a, b = scores[grades == upper], scores[grades == lower]
        if len(a) and len(b):
            edges = np.histogram_bin_edges(np.concatenate([a, b]), bins=bins)
            out[key] = float(np.minimum(np.histogram(a, edges)[0] / len(a), np.histogram(b, edges)[0] / len(b)).sum())
    return out


def precision_at_thresholds(bands: ScoreBands, scores: np.ndarray, grades: np.ndarray) -> dict[str, dict[str, float]]:
    """Per boundary: {threshold, precision = P(grade >= g | score >= threshold), recall, n_above}
    (precision is NaN when no pair scores above the threshold)."""
    scores, grades = _check(scores, grades)
    out = {}
    for key, upper, threshold in zip(bands.boundaries, bands.grades[1:], bands.thresholds):
        above, positive = scores >= threshold, grades >= upper
        out[key] = {"threshold": threshold, "n_above": int(above.sum()),
                    "precision": float(positive[above].mean()) if above.any() else float("nan"),
                    "recall": float(above[positive].mean()) if positive.any() else float("nan")}
    return out


def query_halves(query_ids: Sequence[str], *, seed: int = 0) -> np.ndarray:
    """(n,) bool: True for pairs whose query falls in the second half (stable hash of seed and query id,
    salted apart from the train / held-out split, which the pairs usually come from one side of)."""
    return is_held_out(pd.Series(list(query_ids), dtype=object), 0.5, seed, salt="bands-half").to_numpy(dtype=bool)


def split_half_stability(scores: np.ndarray, grades: np.ndarray, query_ids: Sequence[str], *, seed: int = 0,
                         grade_values: Sequence[int] | None = None,
                         names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Fit bands on one half of the queries (stable hash of seed and query id), apply them to the other.

    Per boundary: {threshold, precision_fit (on the fitting half), precision_other, gap = |difference|,
    n_queries_fit, n_queries_other}.
    """
    scores, grades = _check(scores, grades)
    if len(query_ids) != len(scores):
        raise BandsError(f"{len(query_ids)} query ids for {len(scores)} scores")
    other = query_halves(query_ids, seed=seed)
    ids = np.asarray(query_ids)
    bands = fit_bands(scores[~other], grades[~other], grade_values=grade_values, names=names)
    fit = precision_at_thresholds(bands, scores[~other], grades[~other])
    held = precision_at_thresholds(bands, scores[other], grades[other])
    return {key: {"threshold": fit[key]["threshold"], "precision_fit": fit[key]["precision"],
                  "precision_other": held[key]["precision"],
                  "gap": abs(fit[key]["precision"] - held[key]["precision"]),
                  "n_queries_fit": int(len(set(ids[~other]))), "n_queries_other": int(len(set(ids[other])))}
            for key in fit}


def split_half_gaps(scores: np.ndarray, grades: np.ndarray, query_ids: Sequence[str], *, seed: int = 0,
                    halvings: int = REPEATED_HALVINGS, grade_values: Sequence[int] | None = None,
                    names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """`split_half_stability` over `halvings` halvings (seeds `seed`, `seed` + 1, ...): per boundary {mean_gap,
    max_gap, n_halvings}. A halving that leaves one half without pairs on a side of a boundary is skipped.

    One halving of a few hundred queries moves a threshold's precision by a few points on its own; the mean
    over halvings is the expected gap."""
    gaps: dict[str, list[float]] = {}
    for offset in range(halvings):
        try:
            halves = split_half_stability(scores, grades, query_ids, seed=seed + offset, grade_values=grade_values,
                                          names=names)
        except BandsError:
            continue
        for key, half in halves.items():
            if np.isfinite(half["gap"]):
                gaps.setdefault(key, []).append(half["gap"])
    return {key: {"mean_gap": float(np.mean(values)), "max_gap": float(np.max(values)), "n_halvings": len(values)}
            for key, values in gaps.items()}


def group_precision(bands: ScoreBands, scores: np.ndarray, grades: np.ndarray,
                    groups: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{group: precision_at_thresholds on the pairs of that group}, e.g. groups 'head' / 'tail' per pair."""
    scores, grades = _check(scores, grades)
    groups = np.asarray(groups)
    if groups.shape != scores.shape:
        raise BandsError(f"{len(groups)} group labels for {len(scores)} scores")
    return {str(g): precision_at_thresholds(bands, scores[groups == g], grades[groups == g])
            for g in sorted(set(groups.tolist()))}


def head_tail(query_ids: Sequence[str]) -> np.ndarray:
    """(n,) 'head' for pairs of the half of the queries with the most judged pairs (ties broken by query
    id), else 'tail'.

    A proxy where no query traffic is known: queries that many products were judged for are the
    ones searched (and so sampled for judging) most.
    """
    ids = pd.Series(list(query_ids))
    per_query = ids.value_counts().sort_index()
    order = per_query.rank(method="first", ascending=False)
    return np.where(ids.map(order <= len(per_query) / 2).to_numpy(dtype=bool), "head", "tail")


def band_report(scores: np.ndarray, grades: np.ndarray, query_ids: Sequence[str], *,
                grade_values: Sequence[int] | None = None, names: Sequence[str] | None = None,
                seed: int = 0) -> tuple[ScoreBands, dict]:
    """Fit bands on all pairs and report them: (bands, {thresholds, distributions, adjacent_auc,
    adjacent_overlap, precision, split_half, split_half_repeated, head_tail})."""
    options = {"grade_values": grade_values, "names": names}
    bands = fit_bands(scores, grades, **options)
    report = {"n_pairs": int(len(scores)), "n_queries": int(len(set(query_ids))),
              "thresholds": dict(zip(bands.boundaries, bands.thresholds)),
              "distributions": grade_distributions(scores, grades, **options),
              "adjacent_auc": adjacent_aucs(scores, grades, **options),
              "adjacent_overlap": adjacent_overlap(scores, grades, **options),
              "precision": precision_at_thresholds(bands, scores, grades),
              "split_half": split_half_stability(scores, grades, query_ids, seed=seed, **options),
              "split_half_repeated": split_half_gaps(scores, grades, query_ids, seed=seed, **options),
              "head_tail": group_precision(bands, scores, grades, head_tail(query_ids))}
    return bands, report
