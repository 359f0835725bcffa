"""Hybrid retrieval: BM25 (bm25s, Snowball-stemmed) blended with the neural retriever.

Both systems score the same candidates per query, the union of each one's top k, each with its own
exact score for every candidate (so a product that only one system retrieved is not scored 0 by the
other). Blends of the two runs:

- calibrated: w x the band-calibrated neural probability (the expected grade given the similarity,
  `trainer.bands.ScoreBands.expected_grade`, scaled to [0, 1]) + (1 - w) x BM25 min-max-normalised
  per query; w chosen on dev queries by NDCG@10. The calibrated side is comparable across queries,
  so a single w can hold for all of them. Isotonic calibration is a step function, so products on one
  step keep the order of their similarity (`TIE_BREAK`), not of their ids.
- rrf: reciprocal rank fusion (ranx `fuse`, method 'rrf', k = 60), the reference. A product BM25 scores 0
  (no query word in its text) has no BM25 rank, so only its neural rank counts.
- minmax 50/50: both min-max-normalised per query, averaged (ranx `fuse`, 'wsum'), untuned.
- minmax tuned: the same with w chosen on dev, to separate what calibration adds from what tuning adds.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from labelstore.errors import MnrError
from trainer.bands import ScoreBands

Run = dict[str, dict[str, float]]
WEIGHT_GRID = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))
# the calibrated score adds TIE_BREAK x the similarity: far below the smallest step of a calibration fitted on
# fewer than a million pairs, so it only orders the products that share a step
TIE_BREAK = 1e-7
STEMMER = "english"


class Bm25Index:
    """BM25 (bm25s) over product texts, English stopwords, Snowball stemming (PyStemmer) unless `stemmer` is None."""

    def __init__(self, products: pd.DataFrame, *, stemmer: str | None = STEMMER):
        import bm25s

        self._stemmer = _stemmer(stemmer)
        self.product_ids = products["product_id"].to_numpy()
        self.retriever = bm25s.BM25()
        corpus = bm25s.tokenize(products["product_text"].tolist(), stopwords="en", stemmer=self._stemmer,
                                show_progress=False)
        if not corpus.vocab:
            raise MnrError(f"BM25: none of the {len(products):,} product texts has a word left after English "
                           "stopwords and punctuation, so there is nothing to index; leave BM25 out (--no-bm25)")
        self.retriever.index(corpus, show_progress=False)

    def tokens(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False)

    def run(self, queries: pd.DataFrame, k: int = 100) -> Run:
        """Top k products (score > 0) per query (query_id, query_text)."""
        k = min(k, len(self.product_ids))
        indices, scores = self.retriever.retrieve(self.tokens(queries["query_text"]), k=k, show_progress=False,
                                                  n_threads=0)
        return {qid: {self.product_ids[i]: float(s) for s, i in zip(row_scores, row_indices) if s > 0}
                for qid, row_scores, row_indices in zip(queries["query_id"], scores, indices)}

    def scores(self, query_text: str) -> np.ndarray:
        """(n_products,) BM25 score of every product for one query (all 0 when no token is left after stopwords)."""
        tokens = self.tokens([query_text])[0]
        if not tokens:
            return np.zeros(len(self.product_ids))
        return np.asarray(self.retriever.get_scores(tokens), dtype=float)


def _stemmer(language: str | None):
    if language is None:
        return None
    import Stemmer

    return Stemmer.Stemmer(language)


def complete_runs(neural: Run, lexical: Run, neural_scores, lexical_scores) -> tuple[Run, Run]:
    """Both runs over the union of their candidates per query, each scoring every candidate itself:
    `neural_scores(qid, product_ids)` and `lexical_scores(qid, product_ids)` return (len(product_ids),) arrays."""
    full_neural: Run = {}
    full_lexical: Run = {}
    for qid in neural:
        candidates = sorted(set(neural[qid]) | set(lexical.get(qid, {})))
        full_neural[qid] = dict(zip(candidates, map(float, neural_scores(qid, candidates))))
        full_lexical[qid] = dict(zip(candidates, map(float, lexical_scores(qid, candidates))))
    return full_neural, full_lexical


PLACEHOLDER = "__none__"  # ranx needs every query to rank something; it stands in for an empty ranking


def _ranx(run: Run, name: str):
    from ranx import Run as RanxRun

    return RanxRun({qid: (ranked or {PLACEHOLDER: 0.0}) for qid, ranked in run.items()}, name=name)


def _fuse(runs: Sequence[Run], *, norm: str | None, method: str, params: dict | None = None) -> Run:
    from ranx import fuse

    fused = fuse([_ranx(run, f"run{i}") for i, run in enumerate(runs)], norm=norm, method=method, params=params)
    return {qid: {pid: score for pid, score in ranked.items() if pid != PLACEHOLDER}
            for qid, ranked in fused.to_dict().items()}


def calibrated(neural: Run, bands: ScoreBands) -> Run:
    """The neural run with each similarity replaced by its band-calibrated expected grade in [0, 1]."""
    out: Run = {}
    for qid, ranked in neural.items():
        similarity = np.fromiter(ranked.values(), float)
        out[qid] = dict(zip(ranked, (bands.expected_grade(similarity, normalise=True) + TIE_BREAK * similarity).tolist()))
    return out


def minmax(run: Run) -> Run:
    """Per query, scores rescaled to [0, 1] (ranx's min-max normalisation)."""
    from ranx.normalization import min_max_norm

    return min_max_norm(_ranx(run, "run")).to_dict()


def weighted_sum(first: Run, second: Run, *, weight: float) -> Run:
    """weight x first + (1 - weight) x second, per product (ranx 'wsum'; a product missing from a run counts 0)."""
    return _fuse([first, second], norm=None, method="wsum", params={"weights": [weight, 1.0 - weight]})


def calibrated_blend(neural: Run, lexical: Run, bands: ScoreBands, *, weight: float) -> Run:
    return weighted_sum(calibrated(neural, bands), minmax(lexical), weight=weight)


def minmax_blend(neural: Run, lexical: Run, *, weight: float = 0.5) -> Run:
    return weighted_sum(minmax(neural), minmax(lexical), weight=weight)


def rrf(neural: Run, lexical: Run, *, k: int = 60) -> Run:
    """Reciprocal rank fusion; BM25's ranks are over the products it scores above 0 (the others it did not find)."""
    found = {qid: {pid: score for pid, score in ranked.items() if score > 0} for qid, ranked in lexical.items()}
    return _fuse([neural, found], norm=None, method="rrf", params={"k": k})


def choose_weight(score, blend, *, grid: Sequence[float] = WEIGHT_GRID) -> tuple[float, dict[float, float]]:
    """(the weight of `grid` whose blend scores best, {weight: score}): `blend(weight)` returns a run and
    `score(run)` its dev metric (NDCG@10). Ties go to the weight nearest 0.5."""
    curve = {float(w): float(score(blend(float(w)))) for w in grid}
    best = max(curve, key=lambda w: (round(curve[w], 10), -abs(w - 0.5)))
    return best, curve


@dataclass
class HybridRuns:
    """Per system, its run on the test queries; the dev choices behind them."""

    runs: dict[str, Run]
    calibrated_weight: float
    minmax_weight: float
    dev_curve: dict[float, float] = field(default_factory=dict)
    dev_curve_minmax: dict[float, float] = field(default_factory=dict)


def hybrid_runs(neural: dict[str, Run], lexical: dict[str, Run], dev_score, bands: ScoreBands, *,
                grid: Sequence[float] = WEIGHT_GRID) -> HybridRuns:
    """Blend completed neural and lexical runs ({'dev': run, 'test': run} each): weights chosen on dev by
    `dev_score(run)` (NDCG@10 on the dev queries), the blends' runs on test."""
    weight, curve = choose_weight(dev_score, lambda w: calibrated_blend(neural["dev"], lexical["dev"], bands, weight=w),
                                  grid=grid)
    weight_mm, curve_mm = choose_weight(dev_score, lambda w: minmax_blend(neural["dev"], lexical["dev"], weight=w),
                                        grid=grid)
    test_neural, test_lexical = neural["test"], lexical["test"]
    runs = {"hybrid: calibrated (dev weight)": calibrated_blend(test_neural, test_lexical, bands, weight=weight),
            "hybrid: RRF": rrf(test_neural, test_lexical),
            "hybrid: min-max 50/50": minmax_blend(test_neural, test_lexical, weight=0.5),
            "hybrid: min-max (dev weight)": minmax_blend(test_neural, test_lexical, weight=weight_mm)}
    return HybridRuns(runs, weight, weight_mm, curve, curve_mm)
