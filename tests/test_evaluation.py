"""Labeler evaluation metrics, checked on a hand-computed example, and the report files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from annotator.calibration import apply_temperature, fit_temperature, nll
from annotator.evaluation import EvaluationError, evaluate_labels, expected_calibration_error, write_report

# Four pairs, labels (most relevant first) relevant/partial/irrelevant with grades 2/1/0.
Y_TRUE = np.array([0, 0, 1, 2])
PROBS = np.array([
    [0.75, 0.25, 0.00],  # right, confidence 0.75
    [0.35, 0.65, 0.00],  # wrong (partial for relevant), confidence 0.65
    [0.00, 1.00, 0.00],  # right, confidence 1.0
    [0.65, 0.00, 0.35],  # wrong by two grades, confidence 0.65
])
GRADES = [2, 1, 0]
RAW = np.array([3.0, 2.67, 2.0, 1.0])


@pytest.fixture(scope="module")
def metrics() -> dict:
    return evaluate_labels(Y_TRUE, PROBS, GRADES, RAW, label_names=["relevant", "partial", "irrelevant"],
                           rating_scale=(1.0, 3.0))


def test_classification_metrics_match_hand_computation(metrics: dict) -> None:
    assert metrics["n"] == 4
    assert metrics["accuracy"] == pytest.approx(0.5)
    # F1 per class: 0.5, 2/3, 0
    assert metrics["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    # grades true [2,2,1,0], predicted [2,1,1,2]: p_o = 0.5, p_e = 0.375
    assert metrics["kappa"] == pytest.approx(0.2)
    # quadratic: observed mean squared grade gap 1.25, expected 1.0
    assert metrics["qwk"] == pytest.approx(-0.25)
    assert metrics["within_one_accuracy"] == pytest.approx(0.75)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert metrics["per_label"]["irrelevant"] == {"support": 1, "predicted": 0, "f1": 0.0}


def test_expected_grade_errors_match_hand_computation(metrics: dict) -> None:
    # expected grades 1.75, 1.35, 1.0, 1.3 against 2, 2, 1, 0
    assert metrics["rmse_grade"] == pytest.approx(math.sqrt((0.25**2 + 0.65**2 + 0 + 1.3**2) / 4))
    # on the Home Depot scale (rating = grade + 1): 2.75, 2.35, 2.0, 2.3 against 3.0, 2.67, 2.0, 1.0
    assert metrics["rmse_rating"] == pytest.approx(math.sqrt((0.25**2 + 0.32**2 + 0 + 1.3**2) / 4))
    assert metrics["n_rated"] == 4
    assert metrics["log_loss"] == pytest.approx(-(math.log(0.75) + 2 * math.log(0.35)) / 4)


def test_ece_matches_hand_computation(metrics: dict) -> None:
    # bins: [0.6,0.7) two wrong at 0.65; [0.7,0.8) one right at 0.75; [0.9,1.0] one right at 1.0
    assert metrics["ece"] == pytest.approx(0.5 * 0.65 + 0.25 * 0.25)
    assert metrics["reliability"]["count"] == [2, 1, 1]
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)


def test_unrated_pairs_are_left_out_of_rating_rmse() -> None:
    raw = np.array([3.0, np.nan, 2.0, np.nan])
    result = evaluate_labels(Y_TRUE, PROBS, GRADES, raw, rating_scale=(1.0, 3.0))
    assert result["n_rated"] == 2
    assert result["rmse_rating"] == pytest.approx(math.sqrt((0.25**2 + 0) / 2))


def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(EvaluationError, match="row 1 sums"):
        evaluate_labels(Y_TRUE, PROBS * np.array([[1], [2], [1], [1]]), GRADES)
    with pytest.raises(EvaluationError, match="3 entries but pred_probs has 2"):
        evaluate_labels(np.array([0]), np.array([[0.5, 0.5]]), GRADES)
    with pytest.raises(EvaluationError, match="nothing to evaluate"):
        evaluate_labels(np.array([], dtype=int), np.zeros((0, 3)), GRADES)


def test_report_writes_json_png_and_html(metrics: dict, tmp_path) -> None:
    paths = write_report(metrics, tmp_path / "report", title="hand example")
    assert json.loads(paths["json"].read_text())["qwk"] == pytest.approx(-0.25)
    for key in ("reliability", "confusion"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text()
    assert "hand example" in html and "data:image/png;base64," in html and "partial" in html


def _overconfident_logits(n: int = 2000, k: int = 4, sharpen: float = 4.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (calibrated), reported as logits sharpen * z (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, size=(n, k))
    calibrated = apply_temperature(z, 1.0)
    y = np.array([rng.choice(k, p=row) for row in calibrated])
    return sharpen * z, y


def test_temperature_scaling_lowers_ece_of_overconfident_scores() -> None:
    logits, y = _overconfident_logits()
    temperature = fit_temperature(logits, y)
    assert 3.0 < temperature < 5.5  # the true answer is 4
    before = expected_calibration_error(y, apply_temperature(logits, 1.0))
    after = expected_calibration_error(y, apply_temperature(logits, temperature))
    assert after < before / 2
    assert nll(logits, y, temperature) < nll(logits, y, 1.0)
    # the top label never changes
    assert np.array_equal(apply_temperature(logits, temperature).argmax(1), logits.argmax(1))
