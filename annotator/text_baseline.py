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


# The three match scores lie in [0, 1] beside thousands of sparse TF-IDF columns; scaling them up lets
# the L2-regularised regression give them weight without a large coefficient.
MATCH_FEATURE_SCALE = 4.0


class QueryTitleFeatures(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: a frame with columns query, title -> sparse features (n, d).

    TF-IDF(query), TF-IDF(title), their element-wise product, and query-title match scores that carry
    over to queries never seen in training: the cosine of the word and of the character n-gram
    TF-IDF vectors, and the share of query words found in the title.
    """

    def fit(self, frame: pd.DataFrame, y: Any = None) -> "QueryTitleFeatures":
        texts = pd.concat([frame["query"], frame["title"]]).astype(str)
        self.words_ = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts)
        self.chars_ = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True).fit(texts)
        return self

    def transform(self, frame: pd.DataFrame) -> Any:
        queries, titles = frame["query"].astype(str), frame["title"].astype(str)
        query, title = self.words_.transform(queries), self.words_.transform(titles)
        word_product = query.multiply(title)
        char_cosine = self.chars_.transform(queries).multiply(self.chars_.transform(titles)).sum(axis=1)
        coverage = [len(set(q.lower().split()) & set(t.lower().split())) / max(1, len(set(q.lower().split())))
                    for q, t in zip(queries, titles)]
        matches = np.column_stack([np.asarray(word_product.sum(axis=1)).ravel(), np.asarray(char_cosine).ravel(), coverage])
        return hstack([query, title, word_product, csr_matrix(matches * MATCH_FEATURE_SCALE)]).tocsr()


def tfidf_linear_model() -> Pipeline:
    """The classic baseline every labeler benchmark shows, unfitted: `QueryTitleFeatures` + logistic
    regression, as a scikit-learn pipeline over a frame with columns query, title."""
    return make_pipeline(QueryTitleFeatures(), LogisticRegression(max_iter=3000, C=4.0))


def tfidf_linear_probs(train: pd.DataFrame, test: pd.DataFrame, train_classes: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_test, n_classes) class probabilities of `tfidf_linear_model` fit on `train` (columns query,
    title) with integer classes `train_classes`."""
    model = tfidf_linear_model().fit(train, train_classes)
    probs = np.zeros((len(test), n_classes))
    probs[:, model.classes_] = model.predict_proba(test)
    return probs
