"""Hard-pair mining: a faiss index over product embeddings, and the pairs worth relabelling.

For each query, the top-K neighbours are searched and three kinds of pairs are selected:

- `ambiguous_unlabelled`: unlabelled neighbours whose similarity falls in the ambiguous band
  [low, high], best-ranked first, at most `per_query` per query (default band: between the 10th
  percentile of top-grade and the 90th percentile of lowest-grade labelled pairs, where the model
  mixes the grades up);
- `low_grade_ranked_high`: pairs labelled with the lowest grade that the model ranks within the
  top `high_rank` (an irrelevant product near the top);
- `top_grade_ranked_low`: pairs labelled with the top grade that the model ranks below
  `low_rank` (counting neighbours beyond K as beyond K).

Candidates go to `mining_candidates` with score, rank and reason; new pairs go to `pairs` with
origin 'mined', for the annotator to relabel.

`hard_negatives` is the training-time shortcut: it takes the nearest neighbours no label covers as
lowest-grade training pairs directly, without a relabel (they are never written to the store).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import pandas as pd

from labelstore import ids
from labelstore.errors import MnrError
from labelstore.store import PAIR_COLUMNS, Store, insert_new

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
REASONS = ("ambiguous_unlabelled", "low_grade_ranked_high", "top_grade_ranked_low")


@dataclass
class IndexSpec:
    """How the product index was built (recorded as run params)."""

    kind: str
    n_vectors: int
    dim: int
    params: dict[str, float | int] = field(default_factory=dict)
    build_s: float = 0.0

    def as_dict(self) -> dict:
        return {"index_kind": self.kind, "n_vectors": self.n_vectors, "dim": self.dim, **self.params,
                "build_s": self.build_s}


def build_index(vectors: np.ndarray, kind: str = "auto", exact_threshold: int = 100_000, nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128, train_size: int = 100_000,
                seed: int = 0) -> tuple[faiss.Index, IndexSpec]:
    """An inner-product index over (n, d) float32 normalised vectors.

    'auto' is exact ('flat') up to `exact_threshold` vectors, IVF-Flat above. IVF: nlist defaults
    to 4 * sqrt(n) (a power of two), k-means trained on `train_size` sampled vectors, nprobe to
    nlist / 64. HNSW: `hnsw_m` links per node, efSearch `ef_search`.
    """
    if kind not in INDEX_KINDS:
        raise MnrError(f"unknown index kind '{kind}' (use one of {', '.join(INDEX_KINDS)})")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= exact_threshold else "ivf"
    started = time.perf_counter()
    params: dict[str, float | int] = {}
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
        params = {"hnsw_m": hnsw_m, "ef_search": ef_search}
    else:
        nlist = nlist or max(1, 2 ** round(math.log2(4 * math.sqrt(n))))
        nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per centroid
        nprobe = nprobe or max(1, nlist // 64)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = vectors if n <= train_size else vectors[rng.choice(n, train_size, replace=False)]
        index.train(sample)
        index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe, "train_size": int(min(n, train_size))}
    index.add(vectors)
    return index, IndexSpec(kind, n, dim, params, time.perf_counter() - started)


@dataclass
class MiningConfig:
    top_k: int = 50
    band: tuple[float, float] | None = None
    per_query: int = 5
    high_rank: int = 10
    low_rank: int | None = None
    index_kind: str = "auto"
    exact_threshold: int = 100_000

    def low_rank_or_default(self) -> int:
        return self.low_rank if self.low_rank is not None else max(1, self.top_k // 2)


def default_band(labelled_scores: pd.DataFrame, top_grade: int, low_grade: int) -> tuple[float, float]:
    """The similarities where the model mixes up the extreme grades: between the 10th percentile of
    top-grade pairs and the 90th percentile of lowest-grade pairs (in either order); (0.4, 0.7) without both."""
    low = labelled_scores.loc[labelled_scores["grade"] == low_grade, "score"]
    high = labelled_scores.loc[labelled_scores["grade"] == top_grade, "score"]
    if len(low) and len(high):
        edges = sorted((float(np.quantile(high, 0.1)), float(np.quantile(low, 0.9))))
        return edges[0], edges[1]
    return 0.4, 0.7


def select_candidates(query_ids: np.ndarray, product_ids: np.ndarray, scores: np.ndarray, indices: np.ndarray,
                      labelled: pd.DataFrame, band: tuple[float, float], config: MiningConfig, top_grade: int,
                      low_grade: int) -> pd.DataFrame:
    """The mined candidates: columns query_id, product_id, score, rank, reason, grade (NaN when unlabelled).

    `scores`/`indices` are the (Q, K) neighbour search results of `query_ids` over `product_ids`;
    `labelled` has query_id, product_id, grade and `score` (the model's similarity for every labelled pair).
    """
    grade_of = {(q, p): g for q, p, g in zip(labelled["query_id"], labelled["product_id"], labelled["grade"])}
    low, high = band
    rows: list[dict] = []
    kth_score: dict[str, np.ndarray] = {}
    for qid, row_scores, row_indices in zip(query_ids, scores, indices):
        kth_score[qid] = row_scores
        ambiguous = []
        for rank, (score, index) in enumerate(zip(row_scores, row_indices), start=1):
            if index < 0:
                continue
            pid = product_ids[index]
            grade = grade_of.get((qid, pid))
            if grade is None and low <= score <= high:
                ambiguous.append({"query_id": qid, "product_id": pid, "score": float(score), "rank": rank,
                                  "reason": "ambiguous_unlabelled", "grade": np.nan})
        rows.extend(ambiguous[: config.per_query])
    # labelled pairs against their label: rank = 1 + number of neighbours scoring higher
    for row in labelled.itertuples(index=False):
        neighbours = kth_score.get(row.query_id)
        if neighbours is None or row.grade not in (top_grade, low_grade):
            continue
        rank = 1 + int(np.sum(neighbours > row.score + 1e-7))
        if row.grade == low_grade and rank <= config.high_rank:
            rows.append({"query_id": row.query_id, "product_id": row.product_id, "score": float(row.score),
                         "rank": rank, "reason": "low_grade_ranked_high", "grade": row.grade})
        elif row.grade == top_grade and rank > config.low_rank_or_default():
            rows.append({"query_id": row.query_id, "product_id": row.product_id, "score": float(row.score),
                         "rank": rank, "reason": "top_grade_ranked_low", "grade": row.grade})
    return pd.DataFrame(rows, columns=["query_id", "product_id", "score", "rank", "reason", "grade"])


def write_candidates(store: Store, candidates: pd.DataFrame, dataset_of_query: dict[str, str], run_id: str,
                     model_id: str | None) -> dict[str, int]:
    """Insert new pairs (origin 'mined') and the candidate rows, in one transaction."""
    if candidates.empty:
        return {"pairs": 0, "mining_candidates": 0}
    frame = candidates.assign(
        pair_id=[ids.pair_id(q, p) for q, p in zip(candidates["query_id"], candidates["product_id"])],
        dataset=[dataset_of_query[q] for q in candidates["query_id"]],
        origin="mined", raw_rating=None, rating_variance=None,
    ).drop_duplicates("pair_id")
    new_pairs = frame[frame["grade"].isna()]
    rows = frame.assign(run_id=run_id, model_id=model_id)[["run_id", "pair_id", "model_id", "score", "rank", "reason"]]
    with store.transaction() as con:
        pairs_added = insert_new(con, "pairs", new_pairs, PAIR_COLUMNS)
        con.register("new_candidates_frame", rows)
        try:
            added = con.execute(
                "INSERT INTO mining_candidates (run_id, pair_id, model_id, score, rank, reason) "
                "SELECT run_id, pair_id, model_id, score, rank, reason FROM new_candidates_frame "
                "ON CONFLICT DO NOTHING RETURNING 1").fetchall()
        finally:
            con.unregister("new_candidates_frame")
    return {"pairs": pairs_added, "mining_candidates": len(added)}


def mine(store: Store, model, scheme: str, dataset: str | None, config: MiningConfig, model_id: str | None = None,
         run_id: str | None = None) -> tuple[str, pd.DataFrame, dict]:
    """Embed products and queries of `dataset`, search, select and write candidates. Returns (run_id, candidates, metrics)."""
    from labelstore.schemes import load_scheme
    from trainer.data import load_labelled_pairs, load_products, load_queries
    from trainer.evaluation import pair_scores

    scheme_obj = load_scheme(scheme)
    top_grade, low_grade = scheme_obj.max_grade, min(scheme_obj.grades.values())
    products = load_products(store, dataset, model.product_fields)
    queries = load_queries(store, dataset)
    labelled = pair_scores(model, load_labelled_pairs(store, scheme, dataset, model.product_fields).frame)
    band = config.band or default_band(labelled, top_grade, low_grade)
    params = {"model_id": model_id, "scheme": scheme, "dataset": dataset, "top_k": config.top_k, "band": list(band),
              "per_query": config.per_query, "high_rank": config.high_rank, "low_rank": config.low_rank_or_default()}
    with store.run("mine", params, run_id=run_id) as run:
        product_vectors = model.encode_products(products["product_text"].tolist())
        index, spec = build_index(product_vectors, config.index_kind, config.exact_threshold)
        started = time.perf_counter()
        scores, indices = index.search(model.encode_queries(queries["query_text"].tolist()), min(config.top_k, len(products)))
        search_s = time.perf_counter() - started
        candidates = select_candidates(queries["query_id"].to_numpy(), products["product_id"].to_numpy(), scores,
                                       indices, labelled, band, config, top_grade, low_grade)
        dataset_of_query = dict(store.fetchall("SELECT query_id, dataset FROM queries"))
        written = write_candidates(store, candidates, dataset_of_query, run.run_id, model_id)
        run.metrics.update({**spec.as_dict(), "search_s": search_s, "n_queries": len(queries),
                            "n_products": len(products), "band_low": band[0], "band_high": band[1],
                            **{f"n_{reason}": int((candidates["reason"] == reason).sum()) for reason in REASONS},
                            **{f"inserted_{k}": v for k, v in written.items()}})
        metrics = dict(run.metrics)
    return run.run_id, candidates, metrics


HARD_NEGATIVE_SOURCE = "hard-negative"


def hard_negatives(model, pairs: pd.DataFrame, products: pd.DataFrame, per_query: int, pool: int = 30,
                   grade: int = 0, label: str | None = None, relative_margin: float | None = 0.05,
                   index_kind: str = "auto") -> pd.DataFrame:
    """Unjudged near neighbours as lowest-grade training pairs (positive-aware hard-negative mining).

    `pairs` are labelled pairs (columns query_id, query_text, product_id, grade, ...); `products` the
    catalog (product_id, product_text). For each query of `pairs`, the `pool` products nearest to it
    under `model` are searched; a neighbour the query has no label for is kept when its similarity
    s_n satisfies

        s_n <= s* - relative_margin * |s*|,   s* = max{ s_p : p labelled above `grade` for the query }

    that is (1 - relative_margin) * s* for the usual positive s* (NV-Retriever's "TopK-PercPos",
    Moreira et al. 2024: a neighbour about as close as the best positive is more likely an unjudged
    relevant product than a negative). Queries without such a positive get none;
    `relative_margin=None` keeps every unjudged neighbour. The first `per_query` kept become rows
    with `grade` and `label`, source 'hard-negative'. Returns a frame with the columns of `pairs`,
    at most per_query rows per query.
    """
    if per_query < 1 or pairs.empty:
        return pairs.iloc[0:0].copy()
    queries = pairs.drop_duplicates("query_id")[["query_id", "query_text"]].reset_index(drop=True)
    product_vectors = model.encode_products(products["product_text"].tolist())
    query_vectors = model.encode_queries(queries["query_text"].tolist())
    index, _ = build_index(product_vectors, index_kind)
    scores, neighbours = index.search(query_vectors, min(pool, len(products)))
    ceiling = _positive_ceilings(pairs, queries, query_vectors, product_vectors, products, grade, relative_margin)
    judged = set(zip(pairs["query_id"], pairs["product_id"]))
    product_ids = products["product_id"].to_numpy()
    rows = []
    for query_id, query_text, limit, row_scores, row in zip(queries["query_id"], queries["query_text"], ceiling,
                                                            scores, neighbours):
        kept = [i for s, i in zip(row_scores, row) if i >= 0 and s <= limit and (query_id, product_ids[i]) not in judged]
        rows += [{"pair_id": ids.pair_id(query_id, product_ids[i]), "query_id": query_id, "query_text": query_text,
                  "product_id": product_ids[i], "product_text": products["product_text"].iat[i],
                  "label": label, "grade": grade, "source": HARD_NEGATIVE_SOURCE} for i in kept[:per_query]]
    mined = pd.DataFrame(rows).reindex(columns=pairs.columns)
    if "dataset" in pairs.columns:
        mined["dataset"] = mined["query_id"].map(dict(zip(pairs["query_id"], pairs["dataset"])))
    return mined.astype({"grade": int})


def _positive_ceilings(pairs: pd.DataFrame, queries: pd.DataFrame, query_vectors: np.ndarray,
                       product_vectors: np.ndarray, products: pd.DataFrame, grade: int,
                       relative_margin: float | None) -> np.ndarray:
    """(Q,) the highest similarity a hard negative of each query may have (+inf without a margin)."""
    if relative_margin is None:
        return np.full(len(queries), np.inf)
    row_of_query = {q: i for i, q in enumerate(queries["query_id"])}
    row_of_product = {p: i for i, p in enumerate(products["product_id"])}
    positives = pairs[(pairs["grade"] > grade) & pairs["product_id"].isin(row_of_product)]
    query_rows = positives["query_id"].map(row_of_query).to_numpy()
    similarity = np.einsum("ij,ij->i", query_vectors[query_rows],
                           product_vectors[positives["product_id"].map(row_of_product).to_numpy()])
    best = np.full(len(queries), -np.inf)
    np.maximum.at(best, query_rows, similarity)
    return best - relative_margin * np.abs(best)  # (1 - margin) * best for positive similarities
