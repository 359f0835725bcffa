"""Fitted scikit-learn parts as plain JSON + numpy arrays, and back: no pickle, so loading runs no code.

Only what the labeler's stack and text baseline use: `TfidfVectorizer`, `StandardScaler` and
`LogisticRegression`. ``*_state`` returns ``(params, arrays)``: ``params`` is JSON-ready, ``arrays``
maps names to numpy arrays (saved with ``np.savez``, loaded with ``allow_pickle=False``).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

State = tuple[dict[str, Any], dict[str, np.ndarray]]
# the TfidfVectorizer settings a state records; every other setting is scikit-learn's default
TFIDF_PARAMS = ("analyzer", "ngram_range", "min_df", "sublinear_tf", "lowercase")


def tfidf_state(vectorizer: TfidfVectorizer) -> State:
    """Settings, vocabulary (terms in column order, newline-joined UTF-8: a term never holds a newline) and idf."""
    params = {name: getattr(vectorizer, name) for name in TFIDF_PARAMS}
    params["ngram_range"] = list(params["ngram_range"])
    terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.__getitem__)
    vocabulary = np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8)
    return params, {"vocabulary": vocabulary, "idf": np.asarray(vectorizer.idf_, dtype=np.float64)}


def tfidf_from_state(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> TfidfVectorizer:
    text = arrays["vocabulary"].tobytes().decode("utf-8")
    terms = text.split("\n") if text else []
    settings = {**params, "ngram_range": tuple(params["ngram_range"])}
    vectorizer = TfidfVectorizer(**settings, vocabulary={term: i for i, term in enumerate(terms)})
    vectorizer.idf_ = arrays["idf"]
    return vectorizer


def scaler_state(scaler: StandardScaler) -> State:
    return {}, {"mean": np.asarray(scaler.mean_, dtype=np.float64), "scale": np.asarray(scaler.scale_, dtype=np.float64)}


def scaler_from_state(_params: dict[str, Any], arrays: dict[str, np.ndarray]) -> StandardScaler:
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_ = arrays["mean"], arrays["scale"]
    scaler.var_ = arrays["scale"] ** 2
    scaler.n_features_in_ = len(arrays["mean"])
    return scaler


def logistic_state(model: LogisticRegression) -> State:
    return ({"C": float(model.C), "classes": [int(c) for c in model.classes_]},
            {"coef": np.asarray(model.coef_, dtype=np.float64), "intercept": np.asarray(model.intercept_, dtype=np.float64)})


def logistic_from_state(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> LogisticRegression:
    model = LogisticRegression(C=params["C"])
    model.classes_ = np.asarray(params["classes"])
    model.coef_, model.intercept_ = arrays["coef"], arrays["intercept"]
    model.n_features_in_ = arrays["coef"].shape[1]
    return model


def prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` under ``<prefix>.<name>``, to keep several parts in one ``.npz``."""
    return {f"{prefix}.{name}": value for name, value in arrays.items()}


def unprefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    start = f"{prefix}."
    return {name[len(start):]: value for name, value in arrays.items() if name.startswith(start)}


def content_hash(params: dict[str, Any], arrays: dict[str, np.ndarray], length: int = 12) -> str:
    """A hash of the parameters and the arrays' names, dtypes, shapes and bytes (not of a file: zip
    entries carry timestamps)."""
    sha = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8"))
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        sha.update(f"{name}:{value.dtype.str}:{value.shape}".encode("utf-8"))
        sha.update(value.tobytes())
    return sha.hexdigest()[:length]
