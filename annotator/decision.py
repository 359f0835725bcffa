"""How a labeler turns label probabilities into the one label it writes.

The default is the most probable label (argmax). On a graded scale that is judged by agreement on grades
(quadratic-weighted kappa, QWK) argmax is a poor decision: a calibrated model rarely makes a middle grade
the single most probable one, so the labels it writes pile onto the common grades (on CrowdFlower the
stack without the LLM wrote "2" for 17 of 1,000 test pairs where people said 178). The classic remedy
(every top Kaggle CrowdFlower entry used it) is to place cut-points on the expected grade, fitted to
maximise QWK on held-out pairs:

    E[g] = sum_k p_k * g_k,   label = the label of grade rank b,  b = #{cutoffs c_j < E[g]}

`fit_grade_cutoffs` fits them on (n, K) probabilities that were not fitted on the same pairs
(out-of-fold); `choose_labels` applies them (or argmax when there are none); `cross_fitted_qwk` measures
both decisions honestly on the same pairs, and `decide_by_cutoffs` keeps cut-points only where they win
there. The stack (`annotator.stack`) and an adapter alone (`meta.json` "decision", fitted on its calibrated
dev probabilities) decide this way; `read_decision` reads either record back. The probabilities themselves are untouched: they stay the
calibrated ones, and only the written label moves.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import cohen_kappa_score
from sklearn.model_selection import GroupKFold, KFold

CANDIDATE_QUANTILES = np.linspace(0.005, 0.995, 199)  # where a cut-point may go: quantiles of E[g]
SWEEPS = 3  # coordinate-ascent passes over the cut-points
MIN_PAIRS = 50  # fewer held-out pairs fit no cut-points
DECISION_FOLDS = 5  # cross-fitting folds of `decide_by_cutoffs`
CUTOFFS_RULE = "expected_grade_cutoffs"


class DecisionError(ValueError):
    """Cut-points that cannot be fitted or applied with these inputs."""


def expected_grade(pred_probs: np.ndarray, grades: Sequence[int]) -> np.ndarray:
    """(n,) float: sum over labels of p(label) * grade(label), labels in the order of ``grades``."""
    return np.asarray(pred_probs, dtype=float) @ np.asarray(grades, dtype=float)


def grade_kappa(true_grade: np.ndarray, pred_grade: np.ndarray, weights: str | None = "quadratic") -> float:
    """Cohen's kappa of two grade vectors (``weights`` "quadratic": QWK; None: unweighted); defined where
    sklearn's is nan: 1.0 when both use one single grade and agree, else 0.0."""
    if np.unique(np.concatenate([true_grade, pred_grade])).size < 2:
        return 1.0 if np.array_equal(true_grade, pred_grade) else 0.0
    value = cohen_kappa_score(true_grade, pred_grade, weights=weights)
    return float(value) if np.isfinite(value) else 0.0


def choose_labels(probs: np.ndarray, grades: Sequence[int], cutoffs: Sequence[float] | None = None) -> np.ndarray:
    """(n,) label indices of (n, K) ``probs``: argmax without ``cutoffs``, else by the K-1 ascending cut-points
    on the expected grade (grade units), the band's label being the one of that grade rank."""
    probs = np.asarray(probs, dtype=np.float64)
    if cutoffs is None or len(probs) == 0:
        return probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    check_cutoffs(grades, cutoffs)
    if probs.shape[1] != len(grades):
        raise DecisionError(f"probabilities of {probs.shape[1]} labels, but {len(grades)} grades")
    order = _grade_order(grades)
    return order[np.searchsorted(np.asarray(cutoffs, dtype=np.float64), expected_grade(probs, grades), side="left")]


def check_cutoffs(grades: Sequence[int], cutoffs: Sequence[float]) -> None:
    """`DecisionError` unless ``cutoffs`` are K-1 finite, strictly ascending cut-points for K distinct ``grades``."""
    order = _grade_order(grades)
    cuts = np.asarray(cutoffs, dtype=np.float64)
    if cuts.shape != (len(order) - 1,) or not np.all(np.isfinite(cuts)) or np.any(np.diff(cuts) <= 0):
        raise DecisionError(f"{len(order)} grades need {len(order) - 1} ascending cut-points, got {cuts.tolist()}")


def fit_grade_cutoffs(probs: np.ndarray, targets: np.ndarray, grades: Sequence[int]) -> np.ndarray:
    """(K-1,) ascending cut-points on the expected grade that maximise QWK against ``targets`` ((n,) label
    indices) on (n, K) held-out ``probs``: coordinate ascent from the rounding cut-points (midway between
    grades) over the quantiles of the expected grade; a move must raise QWK, so ties keep rounding."""
    order = _grade_order(grades)
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=int)
    if len(targets) < MIN_PAIRS:
        raise DecisionError(f"{len(targets)} held-out pairs: cut-points need {MIN_PAIRS} or more")
    sorted_grades = np.asarray(grades, dtype=np.float64)[order]
    cuts = (sorted_grades[:-1] + sorted_grades[1:]) / 2
    expected = expected_grade(probs, grades)
    candidates = np.unique(np.quantile(expected, CANDIDATE_QUANTILES))
    true_grades = np.asarray(grades)[targets]
    score = lambda c: grade_kappa(true_grades, sorted_grades[np.searchsorted(c, expected, side="left")])  # noqa: E731
    best = score(cuts)
    for _ in range(SWEEPS):
        improved = False
        for j in range(len(cuts)):
            low = cuts[j - 1] if j > 0 else -np.inf
            high = cuts[j + 1] if j + 1 < len(cuts) else np.inf
            for value in candidates[(candidates > low) & (candidates < high)]:
                trial = cuts.copy()
                trial[j] = value
                trial_score = score(trial)
                if trial_score > best + 1e-12:
                    best, cuts, improved = trial_score, trial, True
        if not improved:
            break
    return cuts


def cross_fitted_qwk(probs: np.ndarray, targets: np.ndarray, grades: Sequence[int], groups: Sequence[Any],
                     folds: int = 5) -> dict[str, Any]:
    """QWK of argmax and of cut-points on the same (n, K) held-out ``probs``, the cut-points fitted on the other
    folds (grouped by ``groups``, e.g. query, when there are enough) and applied to each fold, so neither
    number saw its own pairs' targets through the cut-points (``probs`` being out-of-fold, the models behind them
    did). ``cutoffs_better`` says which decision to keep."""
    probs, targets, groups = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=int), np.asarray(groups)
    if len(targets) < MIN_PAIRS * folds / (folds - 1):
        raise DecisionError(f"{len(targets)} held-out pairs: cross-fitted cut-points need {MIN_PAIRS} in each "
                            f"fitting share of {folds} folds")
    true_grades = np.asarray(grades)[targets]
    argmax_qwk = grade_kappa(true_grades, np.asarray(grades)[choose_labels(probs, grades)])
    if len(np.unique(groups)) >= folds:
        splits = GroupKFold(folds).split(probs, targets, groups)
    else:
        splits = KFold(folds, shuffle=True, random_state=0).split(probs)
    chosen = np.zeros(len(targets), dtype=int)
    for fit_rows, apply_rows in splits:
        cuts = fit_grade_cutoffs(probs[fit_rows], targets[fit_rows], grades)
        chosen[apply_rows] = choose_labels(probs[apply_rows], grades, cuts)
    cutoffs_qwk = grade_kappa(true_grades, np.asarray(grades)[chosen])
    return {"method": f"{folds}-fold cross-fitting of the cut-points on the held-out probabilities",
            "argmax_qwk": round(argmax_qwk, 4), "cutoffs_qwk": round(cutoffs_qwk, 4),
            "cutoffs_better": bool(cutoffs_qwk > argmax_qwk)}


def decide_by_cutoffs(oof_probs: np.ndarray, targets: np.ndarray, grades: Sequence[int],
                      groups: Sequence[Any]) -> tuple[list[int] | None, list[float] | None, dict[str, Any]]:
    """(grades, cut-points, report): cut-points on the expected grade fitted on (n, K) held-out probabilities
    ``oof_probs`` against ``targets`` (n,), kept only when their cross-fitted QWK (folds grouped by ``groups``,
    e.g. query) beats argmax's; (None, None, report) otherwise, or when there are too few pairs or the grades
    are not distinct. The report holds the rule, both cross-fitted QWKs and the cut-points."""
    try:
        report = cross_fitted_qwk(oof_probs, targets, grades, groups, folds=DECISION_FOLDS)
        if not report["cutoffs_better"]:
            return None, None, {**report, "rule": "argmax"}
        cutoffs = fit_grade_cutoffs(oof_probs, targets, grades)
    except DecisionError as exc:
        return None, None, {"rule": "argmax", "reason": str(exc)}
    return [int(g) for g in grades], [float(c) for c in cutoffs], \
        {**report, "rule": CUTOFFS_RULE, "cutoffs": [round(float(c), 4) for c in cutoffs]}


def decision_record(grades: Sequence[int], cutoffs: Sequence[float]) -> dict[str, Any]:
    """What a labeler saves of its cut-points (`read_decision` reads it back)."""
    return {"rule": CUTOFFS_RULE, "grades": [int(g) for g in grades], "cutoffs": [float(c) for c in cutoffs]}


def read_decision(record: Mapping[str, Any] | None, n_labels: int) -> tuple[list[int], list[float]] | None:
    """(grades, cut-points) of a saved decision (`decision_record`), or None for none or argmax;
    `DecisionError` naming what is wrong with it otherwise."""
    if record is None or record.get("rule") == "argmax":
        return None
    if record.get("rule") != CUTOFFS_RULE:
        raise DecisionError(f"decision rule {record.get('rule')!r} is not known (expected '{CUTOFFS_RULE}')")
    try:
        grades, cutoffs = [int(g) for g in record["grades"]], [float(c) for c in record["cutoffs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DecisionError(f"decision without valid grades and cutoffs: {exc}") from exc
    if len(grades) != n_labels:
        raise DecisionError(f"{len(grades)} grades for {n_labels} labels")
    check_cutoffs(grades, cutoffs)
    return grades, cutoffs


def _grade_order(grades: Sequence[int]) -> np.ndarray:
    grades = np.asarray(grades)
    if len(np.unique(grades)) != len(grades) or len(grades) < 2:
        raise DecisionError(f"cut-points need two or more distinct grades, one per label; got {grades.tolist()}")
    return np.argsort(grades, kind="stable")
