"""Hard-pair mining: faiss indexes, candidate selection, and the planted hard pairs found with real MiniLM."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from labelstore import Store
from labelstore.catalog import generate_catalog, write_catalog
from labelstore.ids import pair_id
from labelstore.schemes import load_scheme
from trainer.data import load_labelled_pairs, load_products
from trainer.mining import MiningConfig, build_index, default_band, hard_negatives, mine, select_candidates


def clustered_vectors(n: int, dim: int, n_clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    vectors = centers[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_exact_neighbours(kind: str) -> None:
    vectors = clustered_vectors(5000, 32, 50, seed=0)
    queries = clustered_vectors(50, 32, 50, seed=0)[:50]
    exact, spec_exact = build_index(vectors, "flat")
    approx, spec = build_index(vectors, kind, nprobe=8 if kind == "ivf" else None)
    _, truth = exact.search(queries, 10)
    _, found = approx.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall >= 0.9
    assert spec_exact.kind == "flat" and spec.kind == kind
    assert ("nlist" in spec.params and spec.params["nprobe"] == 8) if kind == "ivf" else spec.params["hnsw_m"] == 32


def test_auto_index_is_exact_for_small_catalogs_and_ivf_above_the_threshold() -> None:
    vectors = clustered_vectors(2000, 16, 20, seed=1)
    assert build_index(vectors, "auto", exact_threshold=5000)[1].kind == "flat"
    _, spec = build_index(vectors, "auto", exact_threshold=1000)
    assert spec.kind == "ivf" and spec.as_dict()["nlist"] >= 1 and spec.n_vectors == 2000


def test_select_candidates_applies_the_three_rules() -> None:
    product_ids = np.array(["a", "b", "c", "d", "e"])
    scores = np.array([[0.9, 0.8, 0.6, 0.5, 0.1]], dtype=np.float32)
    indices = np.array([[0, 1, 2, 3, 4]])
    labelled = pd.DataFrame({"query_id": ["q"] * 3, "product_id": ["a", "c", "x"], "grade": [0, 1, 3],
                             "score": [0.9, 0.6, 0.05]})
    config = MiningConfig(top_k=5, per_query=1, high_rank=2, low_rank=3)
    out = select_candidates(np.array(["q"]), product_ids, scores, indices, labelled, band=(0.4, 0.85),
                            config=config, top_grade=3, low_grade=0)
    found = {(r.product_id, r.reason, r.rank) for r in out.itertuples()}
    # 'b' (0.8) is the best unlabelled pair in the band (per_query=1 keeps only it); 'd' is cut
    assert found == {("b", "ambiguous_unlabelled", 2), ("a", "low_grade_ranked_high", 1),
                     ("x", "top_grade_ranked_low", 6)}


def test_default_band_spans_where_extreme_grades_overlap() -> None:
    scores = pd.DataFrame({"grade": [3] * 10 + [0] * 10,
                           "score": list(np.linspace(0.5, 0.95, 10)) + list(np.linspace(0.0, 0.6, 10))})
    low, high = default_band(scores, top_grade=3, low_grade=0)
    top_p10 = np.quantile(np.linspace(0.5, 0.95, 10), 0.1)
    low_p90 = np.quantile(np.linspace(0.0, 0.6, 10), 0.9)
    assert (low, high) == pytest.approx(tuple(sorted((top_p10, low_p90))))
    assert default_band(scores[scores["grade"] == 3], 3, 0) == (0.4, 0.7)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A catalog store with three planted hard pairs, mined once with zero-shot MiniLM."""
    from trainer.model import TwoTowerModel

    catalog = generate_catalog(n_families=6, seed=0)
    judgments = catalog.judgments
    queries = catalog.queries.set_index("query_id")
    specific = queries[queries["brand"].notna() & queries["size"].notna()].index
    q_flip, q_wrong, q_removed = specific[0], specific[2], specific[4]
    grades = load_scheme("esci").grades
    # 1. its one exact product, labelled irrelevant: an 'irrelevant' pair the model ranks at the top
    flip = judgments.index[(judgments["query_id"] == q_flip) & (judgments["label"] == "exact")][0]
    judgments.loc[flip, ["label", "grade"]] = ["irrelevant", grades["irrelevant"]]
    # 2. a product of another family, labelled exact: an 'exact' pair the model ranks low
    wrong = judgments.index[(judgments["query_id"] == q_wrong) & (judgments["label"] == "irrelevant")][0]
    judgments.loc[wrong, ["label", "grade"]] = ["exact", grades["exact"]]
    # 3. a substitute's judgment removed: an unlabelled neighbour in the ambiguous band
    removed = judgments.index[(judgments["query_id"] == q_removed) & (judgments["label"] == "substitute")][0]
    removed_product = judgments.loc[removed, "product_id"]
    catalog.judgments = judgments.drop(index=removed)
    store = Store(tmp_path_factory.mktemp("mining") / "store.duckdb")
    write_catalog(store, catalog)
    model = TwoTowerModel.from_pretrained(max_seq_length=48)
    run_id, candidates, metrics = mine(store, model, "esci", "synthetic",
                                       MiningConfig(top_k=30, band=(0.3, 1.0), per_query=3, high_rank=5), model_id="zero-shot-test")
    return {"store": store, "model": model, "run_id": run_id, "candidates": candidates, "metrics": metrics,
            "flip": (q_flip, judgments.loc[flip, "product_id"]), "wrong": (q_wrong, judgments.loc[wrong, "product_id"]),
            "removed": (q_removed, removed_product)}


def reasons_of(planted: dict, key: str) -> set[str]:
    query, product = planted[key]
    rows = planted["candidates"]
    return set(rows[(rows["query_id"] == query) & (rows["product_id"] == product)]["reason"])


def test_mining_finds_the_planted_hard_pairs(planted: dict) -> None:
    assert reasons_of(planted, "flip") == {"low_grade_ranked_high"}
    assert reasons_of(planted, "wrong") == {"top_grade_ranked_low"}
    rows = planted["candidates"]
    assert reasons_of(planted, "removed") == {"ambiguous_unlabelled"}, (
        planted["metrics"], rows[rows["query_id"] == planted["removed"][0]])


def test_mining_writes_candidates_pairs_and_run(planted: dict) -> None:
    store: Store = planted["store"]
    query, product = planted["removed"]
    mined = store.df("SELECT origin FROM pairs WHERE pair_id = ?", [pair_id(query, product)])
    assert mined["origin"].tolist() == ["mined"]
    rows = store.df("SELECT * FROM mining_candidates WHERE run_id = ?", [planted["run_id"]])
    assert len(rows) == len(planted["candidates"].drop_duplicates(["query_id", "product_id"]))
    assert set(rows["model_id"]) == {"zero-shot-test"} and rows["rank"].min() >= 1
    run = store.df("SELECT status, params, metrics FROM runs WHERE run_id = ?", [planted["run_id"]]).iloc[0]
    assert run["status"] == "ok" and '"index_kind": "flat"' in run["metrics"] and '"band"' in run["params"]
    assert planted["metrics"]["inserted_mining_candidates"] == len(rows)
    # labelled pairs flagged against their label are candidates but not new pairs: the new pairs are
    # exactly the unlabelled candidates, and the count reported is the store's count of mined pairs
    candidates = planted["candidates"]
    unlabelled = candidates[candidates["reason"] == "ambiguous_unlabelled"]
    expected = {pair_id(q, p) for q, p in zip(unlabelled["query_id"], unlabelled["product_id"])}
    mined_ids = set(store.df("SELECT pair_id FROM pairs WHERE origin = 'mined'")["pair_id"])
    assert mined_ids == expected and len(expected) > 0
    assert planted["metrics"]["inserted_pairs"] == len(mined_ids) == planted["metrics"]["n_ambiguous_unlabelled"]
    labelled_ids = {pair_id(q, p) for q, p in zip(candidates["query_id"], candidates["product_id"])} - expected
    assert labelled_ids and not labelled_ids & mined_ids


def test_hard_negatives_are_each_querys_nearest_unlabelled_products(planted: dict) -> None:
    store: Store = planted["store"]
    pairs = load_labelled_pairs(store, "esci", "synthetic", ("title",)).frame
    products = load_products(store, "synthetic", ("title",))
    model = planted["model"]
    mined = hard_negatives(model, pairs, products, per_query=2, pool=10, grade=0, label="irrelevant",
                           relative_margin=None)

    assert list(mined.columns) == list(pairs.columns) and len(mined)
    assert mined.groupby("query_id").size().max() <= 2
    assert not set(zip(mined["query_id"], mined["product_id"])) & set(zip(pairs["query_id"], pairs["product_id"]))
    assert set(mined["grade"]) == {0} and set(mined["label"]) == {"irrelevant"} and set(mined["source"]) == {"hard-negative"}
    assert (mined["pair_id"] == [pair_id(q, p) for q, p in zip(mined["query_id"], mined["product_id"])]).all()
    assert (mined["dataset"] == "synthetic").all()
    # the removed substitute is the unlabelled product nearest to its query
    query, product = planted["removed"]
    assert product in set(mined.loc[mined["query_id"] == query, "product_id"])
    # brute force: each query's mined products are its best-scoring unjudged ones among its 10 nearest
    queries = pairs.drop_duplicates("query_id")
    scores = model.encode_queries(queries["query_text"].tolist()) @ model.encode_products(products["product_text"].tolist()).T
    judged = set(zip(pairs["query_id"], pairs["product_id"]))
    for query_id, row in zip(queries["query_id"], scores):
        nearest = products["product_id"].to_numpy()[np.argsort(-row)[:10]]
        expected = [p for p in nearest if (query_id, p) not in judged][:2]
        assert set(mined.loc[mined["query_id"] == query_id, "product_id"]) == set(expected)


def test_positive_aware_hard_negatives_stay_below_each_querys_best_positive(planted: dict) -> None:
    store: Store = planted["store"]
    pairs = load_labelled_pairs(store, "esci", "synthetic", ("title",)).frame
    products = load_products(store, "synthetic", ("title",))
    model = planted["model"]
    # a duplicate listing of one query's exact product: unjudged, and as close to the query as its best positive
    exact = pairs[pairs["grade"] == pairs["grade"].max()].iloc[0]
    duplicate = products[products["product_id"] == exact["product_id"]].assign(product_id="duplicate-listing")
    products = pd.concat([products, duplicate], ignore_index=True)
    unguarded = hard_negatives(model, pairs, products, per_query=3, pool=20, grade=0, relative_margin=None)
    guarded = hard_negatives(model, pairs, products, per_query=3, pool=20, grade=0, relative_margin=0.05)

    def similarity(frame: pd.DataFrame) -> np.ndarray:
        return np.einsum("ij,ij->i", model.encode_queries(frame["query_text"].tolist()),
                         model.encode_products(frame["product_text"].tolist()))

    positives = pairs[pairs["grade"] > 0].assign(score=lambda f: similarity(f))
    best = positives.groupby("query_id")["score"].max()
    scores = similarity(guarded)
    assert len(guarded) and (scores <= 0.95 * guarded["query_id"].map(best).to_numpy() + 1e-5).all()
    # the guard drops the unjudged neighbours that score about as high as a positive (likely relevant ones)
    too_close = similarity(unguarded) > 0.95 * unguarded["query_id"].map(best).to_numpy() + 1e-5
    assert (exact["query_id"], "duplicate-listing") in set(zip(unguarded["query_id"], unguarded["product_id"]))
    dropped = set(zip(unguarded.loc[too_close, "query_id"], unguarded.loc[too_close, "product_id"]))
    assert not dropped & set(zip(guarded["query_id"], guarded["product_id"]))
