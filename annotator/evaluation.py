"""Evaluate a labeler's output against reference labels: metrics, calibration, plots, HTML.

Functions take arrays (cleanlab style):

- ``y_true``: (n,) int, the index of each example's reference label among the scheme's labels
  (the columns of ``pred_probs``, most relevant first as in ``LabelScheme.label_names``).
- ``pred_probs``: (n, K) float, each row a probability distribution over the K labels.
  A hard labeler (no probabilities) passes one-hot rows.
- ``grades``: (K,) int, the grade of each column (higher is more relevant).
- ``raw_ratings``: (n,) float or None, the dataset's own rating of each pair (Home Depot mean
  rating 1-3, CrowdFlower median 1-4); NaN where unknown.

Metrics come from scikit-learn; only the binning of the expected calibration error is ours.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jinja2 import Template  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    root_mean_squared_error,
)

from annotator.decision import expected_grade, grade_kappa  # noqa: E402
from labelstore.errors import MnrError  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


class EvaluationError(MnrError):
    """The inputs of an evaluation do not fit together (shapes, empty sets, bad probabilities)."""


def check_inputs(y_true: np.ndarray, pred_probs: np.ndarray, grades: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert: returns (y_true (n,) int, pred_probs (n, K) float, grades (K,) int)."""
    y_true = np.asarray(y_true)
    pred_probs = np.asarray(pred_probs, dtype=float)
    grades_arr = np.asarray(grades, dtype=int)
    if pred_probs.ndim != 2:
        raise EvaluationError(f"pred_probs must be (n, K), got shape {pred_probs.shape}")
    n, k = pred_probs.shape
    if n == 0:
        raise EvaluationError("nothing to evaluate: no examples have both a prediction and a reference label")
    if y_true.shape != (n,):
        raise EvaluationError(f"y_true has shape {y_true.shape}, expected ({n},) to match pred_probs")
    if grades_arr.shape != (k,):
        raise EvaluationError(f"grades has {grades_arr.shape[0]} entries but pred_probs has {k} columns")
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= k:
        raise EvaluationError(f"y_true must hold class indices in 0..{k - 1}")
    if not np.all(np.isfinite(pred_probs)) or pred_probs.min() < 0:
        raise EvaluationError("pred_probs must be finite and non-negative")
    row_sums = pred_probs.sum(axis=1)
    bad = np.flatnonzero(np.abs(row_sums - 1.0) > 1e-3)
    if bad.size:
        raise EvaluationError(f"pred_probs row {int(bad[0])} sums to {row_sums[bad[0]]:.4f}, not 1")
    return y_true.astype(int), pred_probs, grades_arr


def grade_to_rating(grade: np.ndarray, max_grade: int, rating_scale: tuple[float, float]) -> np.ndarray:
    """Map grades 0..max_grade linearly onto a dataset's rating scale (low, high).

    Home Depot under graded3: grade 0..2 -> rating 1..3, i.e. rating = grade + 1.
    """
    low, high = rating_scale
    return low + np.asarray(grade, dtype=float) * (high - low) / max_grade


def calibration_bins(y_true: np.ndarray, pred_probs: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Top-label reliability table with uniform bins over [0, 1].

    Returns a dict of lists, one entry per non-empty bin: ``confidence`` (mean top probability),
    ``accuracy`` (fraction whose top label is right), ``count``; plus ``ece``, the count-weighted
    mean of |accuracy - confidence| (Guo et al. 2017).
    """
    y_true = np.asarray(y_true)
    pred_probs = np.asarray(pred_probs, dtype=float)
    confidence = pred_probs.max(axis=1)
    correct = (pred_probs.argmax(axis=1) == y_true).astype(int)
    # calibration_curve needs both outcomes present; pad with nothing when it cannot bin
    if correct.min() == correct.max():
        accuracy_per_bin, confidence_per_bin = _single_outcome_bins(correct, confidence, n_bins)
    else:
        accuracy_per_bin, confidence_per_bin = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # the same bin assignment calibration_curve uses
    bin_ids = np.searchsorted(edges[1:-1], confidence)
    counts = np.bincount(bin_ids, minlength=n_bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts / counts.sum() * np.abs(accuracy_per_bin - confidence_per_bin)))
    return {"ece": ece, "n_bins": n_bins, "confidence": confidence_per_bin.tolist(),
            "accuracy": accuracy_per_bin.tolist(), "count": counts.astype(int).tolist()}


def _single_outcome_bins(correct: np.ndarray, confidence: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_ids = np.searchsorted(edges[1:-1], confidence)
    present = np.unique(bin_ids)
    accuracy = np.array([correct[bin_ids == b].mean() for b in present], dtype=float)
    mean_confidence = np.array([confidence[bin_ids == b].mean() for b in present], dtype=float)
    return accuracy, mean_confidence


def expected_calibration_error(y_true: np.ndarray, pred_probs: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE with ``n_bins`` uniform bins (see `calibration_bins`)."""
    return calibration_bins(y_true, pred_probs, n_bins)["ece"]


def evaluate_labels(y_true: np.ndarray, pred_probs: np.ndarray, grades: Sequence[int],
                    raw_ratings: np.ndarray | None = None, *, label_names: Sequence[str] | None = None,
                    rating_scale: tuple[float, float] | None = None, n_bins: int = 10,
                    chosen: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of one labeler against reference labels.

    The labels the labeler wrote are ``chosen`` ((n,) label indices; `annotator.decision`), or the argmax of
    ``pred_probs`` when not given: accuracy, F1, kappa, QWK and the confusion matrix judge them, and the
    probability metrics (RMSE of the expected grade, log-loss, ECE) judge ``pred_probs``.

    Returns a JSON-ready dict: ``n``, ``accuracy``, ``macro_f1``, ``kappa`` (unweighted Cohen),
    ``qwk`` (quadratic-weighted Cohen's kappa on grades), ``within_one_accuracy`` (|grade error| <= 1),
    ``rmse_grade`` (expected grade against the reference grade), ``log_loss``, ``ece`` and
    ``reliability`` (see `calibration_bins`), ``confusion_matrix`` (rows: reference, columns:
    predicted, in label order), ``per_label`` (support, predicted count, F1), and, when
    ``raw_ratings`` and ``rating_scale`` are given, ``rmse_rating``: RMSE of the expected grade,
    mapped onto the rating scale with `grade_to_rating`, against the raw rating (pairs with no
    rating are left out; ``n_rated`` says how many were used).
    """
    y_true, pred_probs, grades_arr = check_inputs(y_true, pred_probs, grades)
    n, k = pred_probs.shape
    names = list(label_names) if label_names is not None else [f"label_{i}" for i in range(k)]
    y_pred = pred_probs.argmax(axis=1) if chosen is None else np.asarray(chosen, dtype=int)
    if y_pred.shape != (n,) or (n and (y_pred.min() < 0 or y_pred.max() >= k)):
        raise EvaluationError(f"chosen labels must be {n} indices in 0..{k - 1}")
    true_grade, pred_grade = grades_arr[y_true], grades_arr[y_pred]
    expected = expected_grade(pred_probs, grades_arr)
    classes = list(range(k))
    clipped = np.clip(pred_probs, 1e-12, 1.0)
    metrics: dict[str, Any] = {
        "n": int(n),
        "labels": names,
        "grades": grades_arr.tolist(),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "kappa": grade_kappa(true_grade, pred_grade, None),
        "qwk": grade_kappa(true_grade, pred_grade, "quadratic"),
        "within_one_accuracy": float(np.mean(np.abs(true_grade - pred_grade) <= 1)),
        "rmse_grade": float(root_mean_squared_error(true_grade, expected)),
        "log_loss": float(log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=classes)),
    }
    if raw_ratings is not None and rating_scale is not None:
        ratings = np.asarray(raw_ratings, dtype=float)
        if ratings.shape != (n,):
            raise EvaluationError(f"raw_ratings has shape {ratings.shape}, expected ({n},)")
        rated = np.isfinite(ratings)
        if rated.any():
            predicted_rating = grade_to_rating(expected, int(grades_arr.max()), rating_scale)
            metrics["rmse_rating"] = float(root_mean_squared_error(ratings[rated], predicted_rating[rated]))
            metrics["n_rated"] = int(rated.sum())
            metrics["rating_scale"] = list(rating_scale)
    reliability = calibration_bins(y_true, pred_probs, n_bins)
    metrics["ece"] = reliability["ece"]
    metrics["reliability"] = reliability
    metrics["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=classes).tolist()
    per_label_f1 = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    metrics["per_label"] = {
        name: {"support": int(np.sum(y_true == i)), "predicted": int(np.sum(y_pred == i)), "f1": float(per_label_f1[i])}
        for i, name in enumerate(names)
    }
    return metrics


# -- plots and report ---------------------------------------------------------------------------
def plot_reliability(metrics: dict[str, Any], path: Path) -> Path:
    """Reliability diagram (top-label accuracy against confidence per bin) as a PNG."""
    reliability = metrics["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.plot(reliability["confidence"], reliability["accuracy"], marker="o", label="labeler")
    for x, y, count in zip(reliability["confidence"], reliability["accuracy"], reliability["count"]):
        ax.annotate(str(count), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="dimgrey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability, ECE = {metrics['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(metrics: dict[str, Any], path: Path) -> Path:
    """Confusion matrix (rows: reference label, columns: predicted) as a PNG."""
    matrix = np.asarray(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ConfusionMatrixDisplay(matrix, display_labels=metrics["labels"]).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


REPORT_TEMPLATE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}.plots img{max-width:46%;margin-right:2%}</style></head>
<body>
<h1>{{ title }}</h1>
<p>{{ description }}</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th></tr>
{% for name, value in headline %}<tr><td style="text-align:left">{{ name }}</td><td>{{ value }}</td></tr>
{% endfor %}</table>
<h2>Per label</h2>
<table><tr><th>label</th><th>grade</th><th>support</th><th>predicted</th><th>F1</th></tr>
{% for name, grade in label_rows %}<tr><td style="text-align:left">{{ name }}</td><td>{{ grade }}</td>
<td>{{ metrics.per_label[name].support }}</td><td>{{ metrics.per_label[name].predicted }}</td>
<td>{{ "%.3f"|format(metrics.per_label[name].f1) }}</td></tr>
{% endfor %}</table>
<h2>Plots</h2>
<div class="plots"><img alt="reliability diagram" src="data:image/png;base64,{{ reliability_png }}">
<img alt="confusion matrix" src="data:image/png;base64,{{ confusion_png }}"></div>
</body></html>
""")

HEADLINE_METRICS = ("n", "accuracy", "macro_f1", "kappa", "qwk", "within_one_accuracy", "rmse_grade",
                    "rmse_rating", "n_rated", "log_loss", "ece")


def write_report(metrics: dict[str, Any], out_dir: Path, title: str = "Labeler evaluation",
                 description: str = "") -> dict[str, Path]:
    """Write ``metrics.json``, ``reliability.png``, ``confusion.png`` and ``report.html`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "metrics.json",
        "reliability": plot_reliability(metrics, out_dir / "reliability.png"),
        "confusion": plot_confusion(metrics, out_dir / "confusion.png"),
        "html": out_dir / "report.html",
    }
    paths["json"].write_text(json.dumps(metrics, indent=2, sort_keys=True), encoding="utf-8")
    headline = [(name, _fmt(metrics[name])) for name in HEADLINE_METRICS if name in metrics]
    html = REPORT_TEMPLATE.render(
        title=title, description=description, metrics=metrics, headline=headline,
        label_rows=list(zip(metrics["labels"], metrics["grades"])),
        reliability_png=base64.b64encode(paths["reliability"].read_bytes()).decode("ascii"),
        confusion_png=base64.b64encode(paths["confusion"].read_bytes()).decode("ascii"),
    )
    paths["html"].write_text(html, encoding="utf-8")
    return paths


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# -- labels from the store --------------------------------------------------------------------------
# One label per pair of `$scheme` from the sources in `$sources`: the earliest source in `$sources`
# wins (so 'human,import' prefers a human label), then the newest; an undone decision does not count.
# Optional run / author filters.
LABELLED_PAIRS_SQL = """
SELECT pair_id, query_id, dataset, query, title, description, brand, raw_rating, label, grade, probs, source, author, run_id,
       label_id
FROM (
    SELECT l.pair_id, p.query_id, p.dataset, q.text AS query, pr.title, pr.description, pr.brand, p.raw_rating,
           l.label, l.grade, l.probs, l.source, l.author, l.run_id, l.label_id,
           row_number() OVER (PARTITION BY l.pair_id
                              ORDER BY list_position($sources, l.source), l.created_at DESC, l.label_id DESC) AS pick
    FROM live_labels l
    JOIN pairs p ON p.pair_id = l.pair_id
    JOIN queries q ON q.query_id = p.query_id
    JOIN products pr ON pr.product_id = p.product_id
    WHERE l.scheme = $scheme
      AND list_contains($sources, l.source)
      AND (CAST($run_id AS VARCHAR) IS NULL OR l.run_id = $run_id)
      AND (CAST($author AS VARCHAR) IS NULL OR l.author = $author)
) WHERE pick = 1
ORDER BY pair_id
"""


def labelled_pairs(store: Any, scheme: str, sources: Sequence[str], *, run_id: str | None = None,
                   author: str | None = None) -> "pd.DataFrame":
    """One row per pair with a label of ``scheme`` from ``sources`` (earlier sources win), with its text.

    Columns: pair_id, query_id, dataset, query, title, description, brand, raw_rating, label, grade,
    probs (JSON text or None), source, author, run_id, label_id.
    """
    return store.df(LABELLED_PAIRS_SQL, {"scheme": scheme, "sources": list(sources), "run_id": run_id,
                                          "author": author})
