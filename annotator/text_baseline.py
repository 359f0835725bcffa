"""The text baseline labeler: TF-IDF + query-title match features + logistic regression.

It is the cheap reference every LLM labeler is compared with, and its match features feed the stack
that combines them with the LLM's label log-probabilities.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix, hstack
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from annotator.sklearn_state import (
    State,
    logistic_from_state,
    logistic_state,
    prefixed,
    tfidf_from_state,
    tfidf_state,
    unprefixed,
)


# The three match scores lie in [0, 1] beside thousands of sparse TF-IDF columns; scaling them up lets
# the L2-regularised regression give them weight without a large coefficient.
MATCH_FEATURE_SCALE = 4.0
MATCH_FEATURES = ("word_cosine", "char_cosine", "query_coverage")


class QueryTitleFeatures(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: a frame with columns query, title -> sparse features (n, d).

    TF-IDF(query), TF-IDF(title), their element-wise product, and query-title match scores that carry
    over to queries never seen in training: the cosine of the word and of the character n-gram
    TF-IDF vectors, and the share of query words found in the title.
    """

    def fit(self, frame: pd.DataFrame, y: Any = None) -> "QueryTitleFeatures":
        texts = pd.concat(_texts(frame))
        self.words_ = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts)
        self.chars_ = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True).fit(texts)
        return self

    def transform(self, frame: pd.DataFrame) -> Any:
        queries, titles = _texts(frame)
        query, title = self.words_.transform(queries), self.words_.transform(titles)
        word_product = query.multiply(title)
        matches = self._matches(queries, titles, word_product)
        return hstack([query, title, word_product, csr_matrix(matches * MATCH_FEATURE_SCALE)]).tocsr()

    def _matches(self, queries: pd.Series, titles: pd.Series, word_product: Any) -> np.ndarray:
        char_cosine = self.chars_.transform(queries).multiply(self.chars_.transform(titles)).sum(axis=1)
        coverage = [len(set(q.lower().split()) & set(t.lower().split())) / max(1, len(set(q.lower().split())))
                    for q, t in zip(queries, titles)]
        return np.column_stack([np.asarray(word_product.sum(axis=1)).ravel(), np.asarray(char_cosine).ravel(), coverage])


def _texts(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Queries and titles as strings; a missing title is empty text, not the word 'nan'."""
    return frame["query"].astype(str), frame["title"].fillna("").astype(str)


def tfidf_linear_model() -> Pipeline:
    """The classic baseline every labeler benchmark shows, unfitted: `QueryTitleFeatures` + logistic
    regression, as a scikit-learn pipeline over a frame with columns query, title."""
    return make_pipeline(QueryTitleFeatures(), LogisticRegression(max_iter=3000, C=4.0))


def tfidf_linear_probs(train: pd.DataFrame, test: pd.DataFrame, train_classes: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_test, n_classes) class probabilities of `tfidf_linear_model` fit on `train` (columns query,
    title) with integer classes `train_classes`."""
    return class_probs(tfidf_linear_model().fit(train, train_classes), test, n_classes)


def class_probs(model: Any, inputs: Any, n_classes: int) -> np.ndarray:
    """(n, n_classes) ``model.predict_proba(inputs)`` spread over every class: a class the model never saw
    in training (absent from ``model.classes_``) gets probability 0."""
    probs = np.zeros((inputs.shape[0], n_classes))
    probs[:, np.asarray(model.classes_, dtype=int)] = model.predict_proba(inputs)
    return probs


def baseline_state(model: Pipeline) -> State:
    """A fitted `tfidf_linear_model` as JSON parameters + arrays (`annotator.sklearn_state`)."""
    features, regression = model[0], model[-1]
    words, word_arrays = tfidf_state(features.words_)
    chars, char_arrays = tfidf_state(features.chars_)
    linear, linear_arrays = logistic_state(regression)
    return ({"words": words, "chars": chars, "linear": linear},
            {**prefixed("words", word_arrays), **prefixed("chars", char_arrays), **prefixed("linear", linear_arrays)})


def baseline_from_state(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Pipeline:
    features = QueryTitleFeatures()
    features.words_ = tfidf_from_state(params["words"], unprefixed("words", arrays))
    features.chars_ = tfidf_from_state(params["chars"], unprefixed("chars", arrays))
    return make_pipeline(features, logistic_from_state(params["linear"], unprefixed("linear", arrays)))
