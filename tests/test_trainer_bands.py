"""Score bands on the generated catalog: planted per-grade score distributions are recovered.

Each judged pair of the catalog (ESCI grades 0..3) gets scores drawn from a normal distribution
planted for its grade. The true Youden threshold of each boundary (where the score densities of the
two sides cross) and the true P(grade >= g | score) follow from the planted mixture, so the fitted
bands can be checked against them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm
from typer.testing import CliRunner

from app.cli import app
from labelstore import Store
from labelstore.catalog import generate_catalog, write_catalog
from trainer.bands import (BandsError, ScoreBands, adjacent_aucs, adjacent_overlap, band_report, fit_bands,
                           group_precision, precision_at_thresholds, query_halves)
from trainer.registry import ZERO_SHOT_MODEL_ID, load_bands, save_bands

MEANS = {0: 0.10, 1: 0.30, 2: 0.50, 3: 0.70}
SIGMA = 0.07
NAMES = ["irrelevant", "complement", "substitute", "exact"]
REPEATS = 6


@pytest.fixture(scope="module")
def planted() -> dict:
    judgments = generate_catalog(n_families=12, seed=0).judgments
    rng = np.random.default_rng(0)
    grades = np.repeat(judgments["grade"].to_numpy(), REPEATS)
    query_ids = np.repeat(judgments["query_id"].to_numpy(), REPEATS)
    scores = rng.normal([MEANS[g] for g in grades], SIGMA)
    priors = {g: float(np.mean(grades == g)) for g in MEANS}
    return {"scores": scores, "grades": grades, "query_ids": query_ids, "priors": priors}


def true_prob_at_least(score: np.ndarray, grade: int, priors: dict[int, float]) -> np.ndarray:
    density = {g: priors[g] * norm.pdf(score, MEANS[g], SIGMA) for g in MEANS}
    return sum(density[g] for g in MEANS if g >= grade) / sum(density.values())


def true_threshold(grade: int, priors: dict[int, float]) -> float:
    """Where the normalised score densities of grade >= g and grade < g cross (TPR - FPR is maximal there)."""
    def side(score: float, upper: bool) -> float:
        members = [g for g in MEANS if (g >= grade) == upper]
        total = sum(priors[g] for g in members)
        return sum(priors[g] * norm.pdf(score, MEANS[g], SIGMA) for g in members) / total

    return brentq(lambda s: side(s, True) - side(s, False), MEANS[grade - 1], MEANS[grade])


def test_planted_thresholds_and_calibration_are_recovered(planted: dict) -> None:
    bands = fit_bands(planted["scores"], planted["grades"], grade_values=[0, 1, 2, 3], names=NAMES)
    assert bands.boundaries == ["complement>irrelevant", "substitute>complement", "exact>substitute"]
    for grade, threshold in zip((1, 2, 3), bands.thresholds):
        assert threshold == pytest.approx(true_threshold(grade, planted["priors"]), abs=0.02), grade
    grid = np.linspace(0.05, 0.75, 57)
    probs = bands.prob_at_least(grid)
    assert probs.shape == (57, 3)
    assert np.all(np.diff(probs, axis=1) <= 1e-12), "P(grade >= g) must not rise with g"
    for column, grade in enumerate((1, 2, 3)):
        error = np.abs(probs[:, column] - true_prob_at_least(grid, grade, planted["priors"]))
        assert error.mean() < 0.04 and error.max() < 0.2, (grade, error.mean(), error.max())
    truth = sum(true_prob_at_least(grid, g, planted["priors"]) for g in (1, 2, 3))
    assert np.abs(bands.expected_grade(grid) - truth).mean() < 0.08
    assert np.allclose(bands.expected_grade(grid, normalise=True), bands.expected_grade(grid) / 3)
    # the bands assign grades: mid-band scores land in their planted grade
    assert bands.assign(np.array(list(MEANS.values()))).tolist() == [0, 1, 2, 3]


def test_separation_reports_follow_the_planted_gap(planted: dict) -> None:
    scores, grades = planted["scores"], planted["grades"]
    aucs = adjacent_aucs(scores, grades, grade_values=[0, 1, 2, 3], names=NAMES)
    expected = norm.cdf(0.2 / (SIGMA * np.sqrt(2)))  # AUC of two normals 0.2 apart
    assert list(aucs) == ["exact>substitute", "substitute>complement", "complement>irrelevant"]
    assert all(auc == pytest.approx(expected, abs=0.03) for auc in aucs.values()), aucs
    overlap = adjacent_overlap(scores, grades, grade_values=[0, 1, 2, 3], names=NAMES)
    assert all(value == pytest.approx(2 * norm.cdf(-0.1 / SIGMA), abs=0.06) for value in overlap.values()), overlap
    # bands that are not separated at all: AUC near 0.5, overlap near 1
    same = np.random.default_rng(1).normal(0.5, SIGMA, len(grades))
    assert adjacent_aucs(same, grades)["3>2"] == pytest.approx(0.5, abs=0.05)
    assert adjacent_overlap(same, grades)["3>2"] > 0.85


def test_precision_and_stability_across_query_halves_and_groups(planted: dict) -> None:
    scores, grades, query_ids = planted["scores"], planted["grades"], planted["query_ids"]
    bands, report = band_report(scores, grades, query_ids, grade_values=[0, 1, 2, 3], names=NAMES)
    assert set(report) >= {"thresholds", "distributions", "adjacent_auc", "adjacent_overlap", "precision",
                           "split_half", "split_half_repeated", "head_tail"}
    assert report["distributions"]["exact"]["p50"] == pytest.approx(MEANS[3], abs=0.01)
    assert report["distributions"]["irrelevant"]["n"] == int(np.sum(grades == 0))
    for boundary, grade in zip(bands.boundaries, (1, 2, 3)):
        threshold = bands.thresholds[grade - 1]
        above = scores >= threshold
        assert report["precision"][boundary]["precision"] == pytest.approx(np.mean(grades[above] >= grade))
        # split-half: the thresholds of the fitting half, applied to the other half's pairs (split by query)
        half = report["split_half"][boundary]
        other = query_halves(query_ids, seed=0)
        half_bands = fit_bands(scores[~other], grades[~other], grade_values=[0, 1, 2, 3], names=NAMES)
        on_other = scores[other] >= half_bands.thresholds[grade - 1]
        assert half["precision_other"] == pytest.approx(np.mean(grades[other][on_other] >= grade))
        assert half["n_queries_fit"] + half["n_queries_other"] == len(set(query_ids))
        assert set(query_ids[other]).isdisjoint(query_ids[~other])
        assert half["gap"] < 0.1  # the halves' grade mixes differ (60 queries), the planted bands do not
        # repeated halvings: the first is the one above; the mean and max over all of them bracket its gap
        repeated = report["split_half_repeated"][boundary]
        assert repeated["n_halvings"] == 20 and repeated["max_gap"] >= half["gap"]
        assert 0.0 <= repeated["mean_gap"] <= repeated["max_gap"] < 0.15
    assert set(report["head_tail"]) == {"head", "tail"}
    # a group whose scores sit lower than the fit loses precision at the same thresholds
    shifted = np.where(np.arange(len(scores)) % 2 == 0, scores, scores + 0.1)
    groups = np.where(np.arange(len(scores)) % 2 == 0, "a", "b")
    by_group = group_precision(bands, shifted, grades, groups)
    assert by_group["b"]["exact>substitute"]["precision"] < by_group["a"]["exact>substitute"]["precision"] - 0.2


def test_errors_and_round_trip(tmp_path, planted: dict) -> None:
    with pytest.raises(BandsError, match="at least two grades"):
        fit_bands(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(BandsError, match="no pair labelled '3': the boundary between '2' and '3'"):
        fit_bands(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 2]), grade_values=[0, 1, 2, 3])
    with pytest.raises(BandsError, match="no pair labelled 'irrelevant': the boundary between 'irrelevant' and 'complement'"):
        fit_bands(np.array([0.1, 0.2, 0.3]), np.array([1, 2, 3]), grade_values=[0, 1, 2, 3], names=NAMES)
    with pytest.raises(BandsError, match="no pair labelled 'substitute' or above"):
        fit_bands(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 1]), grade_values=[0, 1, 2, 3], names=NAMES)
    with pytest.raises(BandsError, match="same length"):
        fit_bands(np.array([0.1, 0.2]), np.array([0]))
    with pytest.raises(BandsError, match="malformed"):
        ScoreBands.from_dict({"grades": [0, 1], "names": ["a", "b"], "thresholds": [], "knots": []})
    bands = fit_bands(planted["scores"], planted["grades"], names=NAMES)
    again = ScoreBands.from_dict(json.loads(json.dumps(bands.to_dict())))
    grid = np.linspace(0, 1, 11)
    assert np.array_equal(again.prob_at_least(grid), bands.prob_at_least(grid))
    assert precision_at_thresholds(again, planted["scores"], planted["grades"]) == \
        precision_at_thresholds(bands, planted["scores"], planted["grades"])


def test_cli_bands_fits_and_stores_them_with_the_zero_shot_model(tmp_path) -> None:
    store = Store(tmp_path / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=6, seed=0))
    result = CliRunner().invoke(app, ["--store", str(store.path), "bands", "--model", "zero-shot", "--dataset",
                                      "synthetic", "--holdout", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    stored = load_bands(store, ZERO_SHOT_MODEL_ID)
    assert list(stored.thresholds) == pytest.approx(printed["bands"]["thresholds"])
    assert stored.names == ("irrelevant", "complement", "substitute", "exact")
    assert printed["report"]["adjacent_auc"]["exact>substitute"] > 0.5
    assert store.scalar("SELECT count(*) FROM runs WHERE kind = 'bands' AND status = 'ok'") == 1
    assert printed["report"]["fitted_on"] == {"scheme": "esci", "dataset": "synthetic", "holdout": 0.5, "seed": 0,
                                              "n_queries": printed["report"]["n_queries"],
                                              "n_pairs": printed["report"]["n_pairs"]}
    result = CliRunner().invoke(app, ["--store", str(store.path), "bands", "--model", "zero-shot", "--dataset",
                                      "synthetic", "--holdout", "0.5"])
    assert result.exit_code == 0 and "prec B" in result.stdout, result.output
    few = CliRunner().invoke(app, ["--store", str(store.path), "bands", "--model", "zero-shot", "--dataset",
                                   "synthetic", "--holdout", "0.1", "--json"])
    assert few.exit_code == 0, few.output
    assert json.loads(few.stdout)["report"]["fitted_on"]["holdout"] == 0.1  # the warning went to stderr
    assert "warning: bands fitted on" in " ".join(few.stderr.split())


def test_load_bands_names_the_missing_model_fit(tmp_path) -> None:
    from labelstore.errors import MnrError
    from trainer.registry import ensure_zero_shot

    store = Store(tmp_path / "store.duckdb")
    ensure_zero_shot(store)
    with pytest.raises(MnrError, match="no score bands yet; run mnr bands"):
        load_bands(store, ZERO_SHOT_MODEL_ID)
    bands = fit_bands(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    save_bands(store, ZERO_SHOT_MODEL_ID, bands, {"n_pairs": 4})
    assert load_bands(store, ZERO_SHOT_MODEL_ID).thresholds == bands.thresholds
