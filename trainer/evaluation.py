"""Retrieval evaluation: rank a dataset's whole product set for held-out queries, score with ranx.

Metrics (graded qrels: a product's relevance is its label's grade, e.g. graded3: 2, 1, 0):
- ndcg@10: graded NDCG, ranx's Jarvelin form (linear gain = grade, log2 discount).
- recall@100: share of the query's *top-grade* products (e.g. 'relevant', 'exact') in the top 100.
- mrr: reciprocal rank of the first top-grade product (within the top 100).
Queries without any top-grade product are kept for NDCG (their partial products still count) but
ranx counts them as 0 for recall and MRR; `n_queries_with_top_grade` says how many have one.

Band separation: for the held-out labelled pairs, the distribution of cosine similarity per grade
and the ROC AUC between adjacent grades (P(similarity of a grade-g pair > grade-(g-1) pair)).

Policy flags: given the set of flagged products (`labelstore.flags.flagged_product_ids`, read by the
caller), each system reports `flagged@10`, the mean number of flagged products in a query's top 10, and
`flagged@10_total`, their sum over the queries. With `exclude_flagged`, each system is evaluated a second
time with flagged products filtered out of its rankings (ranked deep enough that k products remain), as
`<system> (flagged excluded)`.

Incomplete judgments: a product nobody judged for a query counts as irrelevant, so a model that ranks
unjudged relevant products high looks worse than one that learnt which products got judged. Every report
carries `judged@10` (mean share of the top 10 that was judged for the query, any grade); with `condensed`,
each system is evaluated a second time on its condensed ranking (Sakai 2007: its top-k ranking with the
unjudged products removed; judged products it ranks below k stay out), as `<system> (judged only)`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import pandas as pd

from labelstore.errors import MnrError
from labelstore.schemes import LabelScheme
from trainer.bands import BandsError, ScoreBands, adjacent_aucs, band_report, fit_bands, grade_distributions
from trainer.data import LabelledPairs
from trainer.hybrid import (
    PLACEHOLDER, STEMMER, WEIGHT_GRID, Bm25Index, calibrated_blend, choose_weight, complete_runs, hybrid_runs, minmax,
    minmax_blend,
)
from trainer.model import TwoTowerModel

Run = dict[str, dict[str, float]]
FLAG_DEPTH = 10
EXCLUDED_SUFFIX = " (flagged excluded)"
JUDGED_SUFFIX = " (judged only)"


@dataclass
class RetrievalReport:
    """Metrics of one system on one held-out query set."""

    system: str
    metrics: dict[str, float]
    bands: dict[str, dict[str, float]] = field(default_factory=dict)
    adjacent_auc: dict[str, float] = field(default_factory=dict)
    run: Run = field(default_factory=dict, repr=False)  # its top-k ranking per query, for paired tests

    def as_dict(self) -> dict:
        return {"system": self.system, **self.metrics, "bands": self.bands, "adjacent_auc": self.adjacent_auc}


def top_ids(ranked: dict[str, float], k: int) -> list[str]:
    """The ids of the `k` best-scored entries of one query's ranking, best first (ties by id)."""
    return [pid for pid, _ in sorted(ranked.items(), key=lambda item: (-item[1], item[0]))[:k]]


def truncate_run(run: Run, k: int) -> Run:
    """Each query's ranking cut to its best `k`."""
    return {qid: {pid: ranked[pid] for pid in top_ids(ranked, k)} for qid, ranked in run.items()}


def exclude_products(run: Run, excluded: frozenset[str]) -> Run:
    """`run` without the `excluded` products (the rest keep their scores, so their order)."""
    return {qid: {pid: score for pid, score in ranked.items() if pid not in excluded} for qid, ranked in run.items()}


def flagged_in_top(run: Run, flagged: frozenset[str], k: int = FLAG_DEPTH) -> dict[str, float]:
    """`flagged@k`: mean over the run's queries of the flagged products in the top `k`; `flagged@k_total`: their sum."""
    counts = [sum(pid in flagged for pid in top_ids(ranked, k)) for ranked in run.values()]
    return {f"flagged@{k}": float(np.mean(counts)) if counts else 0.0, f"flagged@{k}_total": float(sum(counts))}


def judged_products(pairs: pd.DataFrame) -> dict[str, frozenset[str]]:
    """{query_id: the products judged for it, any grade}."""
    return {qid: frozenset(group) for qid, group in pairs.groupby("query_id")["product_id"]}


def judged_only(run: Run, judged: dict[str, frozenset[str]]) -> Run:
    """The condensed run: each query's ranking (as retrieved, e.g. its top k) without the products nobody judged
    for it, order kept."""
    return {qid: {pid: s for pid, s in ranked.items() if pid in judged.get(qid, ())} for qid, ranked in run.items()}


def judged_share(run: Run, judged: dict[str, frozenset[str]], k: int = 10) -> float:
    """Mean over the run's non-empty queries of the share of its top `k` (or all, if shorter) judged for the query."""
    tops = [(qid, top_ids(ranked, k)) for qid, ranked in run.items()]
    shares = [sum(pid in judged.get(qid, ()) for pid in top) / len(top) for qid, top in tops if top]
    return float(np.mean(shares)) if shares else 0.0


def qrels_from_pairs(pairs: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{query_id: {product_id: grade}} for pairs with grade > 0 (grade 0 adds nothing to any metric)."""
    qrels: dict[str, dict[str, int]] = {}
    for row in pairs.loc[pairs["grade"] > 0, ["query_id", "product_id", "grade"]].itertuples(index=False):
        qrels.setdefault(row.query_id, {})[row.product_id] = int(row.grade)
    return qrels


def top_k_search(query_vectors: np.ndarray, product_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: (scores, indices), both (n_queries, min(k, n_products))."""
    index = faiss.IndexFlatIP(product_vectors.shape[1])
    index.add(product_vectors)
    return index.search(query_vectors, min(k, product_vectors.shape[0]))


def dense_run(model: TwoTowerModel, queries: pd.DataFrame, products: pd.DataFrame, k: int = 100,
              product_vectors: np.ndarray | None = None) -> Run:
    """Rank all `products` (product_id, product_text) for each of `queries` (query_id, query_text)."""
    if product_vectors is None:
        product_vectors = model.encode_products(products["product_text"].tolist())
    query_vectors = model.encode_queries(queries["query_text"].tolist())
    scores, indices = top_k_search(query_vectors, product_vectors, k)
    product_ids = products["product_id"].to_numpy()
    return {qid: {product_ids[i]: float(s) for s, i in zip(row_scores, row_indices) if i >= 0}
            for qid, row_scores, row_indices in zip(queries["query_id"], scores, indices)}


def bm25_run(queries: pd.DataFrame, products: pd.DataFrame, k: int = 100, stemmer: str | None = STEMMER) -> Run:
    """The BM25 baseline (bm25s, English stopwords, Snowball stemming) over the same product texts."""
    return Bm25Index(products, stemmer=stemmer).run(queries, k)


def ranx_run(qrels: dict[str, dict[str, int]], run: Run, name: str | None = None):
    """`run` as a ranx Run over the queries of `qrels` (an empty ranking becomes a placeholder ranx accepts)."""
    from ranx import Run as RanxRun

    return RanxRun({qid: (ranked or {PLACEHOLDER: 0.0}) for qid, ranked in run.items() if qid in qrels}, name=name)


def retrieval_metrics(qrels: dict[str, dict[str, int]], run: Run, top_grade: int) -> dict[str, float]:
    """ndcg@10, recall@100 and mrr (relevant = top grade for the last two) via ranx."""
    from ranx import Qrels, evaluate

    names = {"ndcg@10": "ndcg@10", "recall@100": f"recall@100-l{top_grade}", "mrr": f"mrr@100-l{top_grade}"}
    scores = evaluate(Qrels(qrels), ranx_run(qrels, run), list(names.values()), make_comparable=True)
    return {name: float(scores[metric]) for name, metric in names.items()}


def band_separation(pair_scores: pd.DataFrame, scheme: LabelScheme) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-grade score distribution and adjacent-grade AUC of labelled pairs (columns grade, score)."""
    options = _grade_options(scheme)
    scores, grades = pair_scores["score"].to_numpy(), pair_scores["grade"].to_numpy()
    return grade_distributions(scores, grades, **options), adjacent_aucs(scores, grades, **options)


def _grade_options(scheme: LabelScheme) -> dict[str, list]:
    """The scheme's grades ascending and their label names, as `trainer.bands` takes them."""
    labels = sorted(scheme.labels, key=lambda label: label.grade)
    return {"grade_values": [label.grade for label in labels], "names": [label.name for label in labels]}


def pair_scores(model: TwoTowerModel, pairs: pd.DataFrame) -> pd.DataFrame:
    """Cosine similarity of every labelled pair: the frame with a `score` column added."""
    return pairs.assign(score=model.pair_cosines(pairs["query_text"].tolist(), pairs["product_text"].tolist())
                        .astype(np.float64))


def _scored_arrays(model: TwoTowerModel, pairs: LabelledPairs) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """(scores, grades, query_ids, {grade_values, names}) of labelled pairs under `model`."""
    scored = pair_scores(model, pairs.frame)
    return (scored["score"].to_numpy(), scored["grade"].to_numpy(), scored["query_id"].tolist(),
            _grade_options(pairs.scheme))


def model_bands(model: TwoTowerModel, pairs: LabelledPairs, *, seed: int = 0) -> tuple[ScoreBands, dict]:
    """Score bands of `model` fitted on labelled `pairs` (usually held out), with their report (`trainer.bands.band_report`)."""
    scores, grades, query_ids, options = _scored_arrays(model, pairs)
    return band_report(scores, grades, query_ids, seed=seed, **options)


def evaluate_systems(held_out: LabelledPairs, products: pd.DataFrame, systems: dict[str, TwoTowerModel | None],
                     k: int = 100, *, flagged: frozenset[str] | None = None,
                     exclude_flagged: bool = False, condensed: bool = False) -> list[RetrievalReport]:
    """Evaluate each system (a model, or None for BM25) on the held-out queries against all `products`.

    Every report has `judged@10`; with `condensed`, each system gets a second report on its condensed
    ranking (`judged_only`, `JUDGED_SUFFIX`).

    With `flagged` (product ids), each report counts them in the top 10 (`flagged_in_top`); with
    `exclude_flagged` too, each system gets a second report with them filtered out (`EXCLUDED_SUFFIX`).
    """
    frame = held_out.frame
    qrels = qrels_from_pairs(frame)
    queries = _queries(held_out, qrels)
    top_grade = held_out.scheme.max_grade
    if exclude_flagged and flagged is None:
        raise ValueError("exclude_flagged needs the flagged products")
    flagged_here = frozenset(flagged or ()) & frozenset(products["product_id"])
    depth = k + (len(flagged_here) if exclude_flagged else 0)  # k products left after filtering
    judged_ids = judged_products(frame)
    n_left_out = left_out_queries(held_out, qrels)
    reports = []
    for name, model in systems.items():
        bands, auc = {}, {}
        if model is None:
            deep = bm25_run(queries, products, depth)
        else:
            deep = dense_run(model, queries, products, depth)
            bands, auc = band_separation(pair_scores(model, frame), held_out.scheme)
        run = truncate_run(deep, k)
        reports.append(RetrievalReport(name, retrieval_metrics(qrels, run, top_grade), bands, auc, run))
        if condensed:
            short = judged_only(run, judged_ids)
            reports.append(RetrievalReport(name + JUDGED_SUFFIX, retrieval_metrics(qrels, short, top_grade), run=short))
        if exclude_flagged:
            kept = truncate_run(exclude_products(deep, flagged_here), k)
            reports.append(RetrievalReport(name + EXCLUDED_SUFFIX, retrieval_metrics(qrels, kept, top_grade), run=kept))
    for report in reports:
        if flagged is not None:
            report.metrics.update(flagged_in_top(report.run, flagged_here))
        report.metrics["n_queries"] = float(len(queries))
        report.metrics["n_queries_left_out"] = float(n_left_out)
        report.metrics["n_queries_with_top_grade"] = float(sum(
            any(g >= top_grade for g in judged.values()) for judged in qrels.values()))
        report.metrics["n_products"] = float(len(products))
        if not report.system.endswith(JUDGED_SUFFIX):  # a condensed ranking is all judged by construction
            report.metrics["judged@10"] = judged_share(report.run, judged_ids)
    return reports


def _queries(pairs: LabelledPairs, qrels: dict[str, dict[str, int]], part: str = "held-out") -> pd.DataFrame:
    """The queries of `pairs` that have a product to find (a pair above the lowest grade: `qrels_from_pairs`);
    an error when none has."""
    queries = pairs.frame.drop_duplicates("query_id")[["query_id", "query_text"]]
    found = queries[queries["query_id"].isin(qrels)]
    if found.empty:
        which = f"the one {part} query has" if len(queries) == 1 else f"none of the {len(queries):,} {part} queries has"
        raise MnrError(f"{which} a pair labelled above '{pairs.scheme.lowest_label}', so no ranking has anything to find; label such "
                       "pairs, or hold out other queries (--holdout, --seed)")
    return found


def left_out_queries(pairs: LabelledPairs, qrels: dict[str, dict[str, int]]) -> int:
    """How many queries of `pairs` have no pair above the lowest grade, so no metric is computed for them."""
    return int(pairs.frame["query_id"].nunique() - len(qrels))


def dev_test_split(held_out: LabelledPairs, seed: int = 0) -> tuple[LabelledPairs, LabelledPairs]:
    """(dev, test): the held-out queries halved by a hash independent of the train / held-out split."""
    return held_out.split(0.5, seed + 1)


def evaluate_hybrid(model: TwoTowerModel, dev: LabelledPairs, test: LabelledPairs, products: pd.DataFrame, *,
                    k: int = 100, stemmer: str | None = STEMMER, grid: Sequence[float] = WEIGHT_GRID,
                    flagged: frozenset[str] | None = None, exclude_flagged: bool = False,
                    test_ceiling: bool = False) -> tuple[list[RetrievalReport], dict]:
    """BM25, `model` and their blends (`trainer.hybrid`) on the `test` queries; the bands and the blend
    weights are fitted on the `dev` queries' labelled pairs. Returns (reports, {weights, dev curves, sizes}).

    `flagged` and `exclude_flagged` as in `evaluate_systems`: the excluded rankings filter the flagged
    products out of BM25's and the model's candidates (retrieved deep enough to leave k each), and the
    blends are then built and their weights chosen on dev over those filtered candidates, as a catalog filter
    in front of the ranker would.

    `test_ceiling` (analysis only: it reads the test labels) adds to the info, per blend, the weight that scores
    best on the test queries themselves and its NDCG@10: no weight chosen on dev can beat it."""
    if exclude_flagged and flagged is None:
        raise ValueError("exclude_flagged needs the flagged products")
    flagged_here = frozenset(flagged or ()) & frozenset(products["product_id"])
    depth = k + (len(flagged_here) if exclude_flagged else 0)
    product_vectors = model.encode_products(products["product_text"].tolist())
    position = {pid: i for i, pid in enumerate(products["product_id"])}
    index = Bm25Index(products, stemmer=stemmer)
    qrels, deep, vectors, texts = {}, {}, {}, {}
    for part, pairs in (("dev", dev), ("test", test)):
        qrels[part] = qrels_from_pairs(pairs.frame)
        queries = _queries(pairs, qrels[part], part)
        vectors |= dict(zip(queries["query_id"], model.encode_queries(queries["query_text"].tolist())))
        texts |= dict(zip(queries["query_id"], queries["query_text"]))
        deep[part] = (dense_run(model, queries, products, depth, product_vectors), index.run(queries, depth))
    scores, grades, _, options = _scored_arrays(model, dev)
    try:
        bands = fit_bands(scores, grades, **options)
    except BandsError as exc:
        n_dev = dev.frame["query_id"].nunique()
        raise BandsError(f"the dev half of the held-out queries ({n_dev:,} {'query' if n_dev == 1 else 'queries'}): {exc}; "
                         "hold out more queries (--holdout) or split them differently (--seed)") from exc
    top_grade = test.scheme.max_grade
    filters = {"": lambda run: run}
    if exclude_flagged:
        filters[EXCLUDED_SUFFIX] = lambda run: exclude_products(run, flagged_here)
    runs: dict[str, Run] = {}
    info: dict = {}
    for suffix, keep in filters.items():
        base = {part: tuple(truncate_run(keep(run), k) for run in deep[part]) for part in deep}
        neural, lexical = {}, {}
        for part in base:
            neural[part], lexical[part] = complete_runs(
                *base[part],
                lambda qid, ids: product_vectors[[position[p] for p in ids]] @ vectors[qid],
                lambda qid, ids: index.scores(texts[qid])[[position[p] for p in ids]])
        blends = hybrid_runs(neural, lexical, lambda run: retrieval_metrics(qrels["dev"], run, top_grade)["ndcg@10"],
                             bands, grid=grid)
        variant = {"BM25 (bm25s, stemmed)": base["test"][1], "neural": base["test"][0], **blends.runs}
        runs |= {name + suffix: run for name, run in variant.items()}
        if not suffix:
            info = {"calibrated_weight": blends.calibrated_weight, "minmax_weight": blends.minmax_weight,
                    "dev_ndcg@10_by_weight": blends.dev_curve, "dev_ndcg@10_by_weight_minmax": blends.dev_curve_minmax}
            if test_ceiling:
                info["test_ceiling"] = best_weight_on(neural["test"], lexical["test"], bands, qrels["test"], top_grade,
                                                      grid)
                info["test_ceiling_per_query"] = best_weight_per_query(neural["test"], lexical["test"], qrels["test"],
                                                                       grid)
                info["learned_fusion"] = learned_fusion(neural, lexical, qrels, top_grade)
        else:
            info["excluded_weights"] = {"calibrated": blends.calibrated_weight, "minmax": blends.minmax_weight}
    reports = [RetrievalReport(name, retrieval_metrics(qrels["test"], run, top_grade), run=run)
               for name, run in runs.items()]
    for report in reports:
        if flagged is not None:
            report.metrics.update(flagged_in_top(report.run, flagged_here))
        report.metrics["n_queries"] = float(len(qrels["test"]))
        report.metrics["n_products"] = float(len(products))
    info |= {"n_dev_queries": len(qrels["dev"]), "n_test_queries": len(qrels["test"]),
             "n_queries_left_out": left_out_queries(dev, qrels["dev"]) + left_out_queries(test, qrels["test"]),
             "bands": bands.to_dict()}
    return reports, info


def best_weight_on(neural: Run, lexical: Run, bands: ScoreBands, qrels: dict[str, dict[str, int]], top_grade: int,
                   grid: Sequence[float]) -> dict[str, dict[str, float]]:
    """Per blend, {'weight', 'ndcg@10'} of the weight of `grid` that scores best on the queries of `qrels`."""
    def score(run: Run) -> float:
        return retrieval_metrics(qrels, run, top_grade)["ndcg@10"]

    ceiling = {}
    for name, blend in (("calibrated", lambda w: calibrated_blend(neural, lexical, bands, weight=w)),
                        ("minmax", lambda w: minmax_blend(neural, lexical, weight=w))):
        weight, curve = choose_weight(score, blend, grid=grid)
        ceiling[name] = {"weight": weight, "ndcg@10": curve[weight]}
    return ceiling


def per_query_ndcg(qrels: dict[str, dict[str, int]], run: Run) -> dict[str, float]:
    """{query_id: NDCG@10} of `run` on each query of `qrels`."""
    from ranx import Qrels, evaluate

    ranked = ranx_run(qrels, run)
    evaluate(Qrels(qrels), ranked, "ndcg@10", make_comparable=True)
    return {qid: float(ranked.scores["ndcg@10"].get(qid, 0.0)) for qid in sorted(qrels)}


def best_weight_per_query(neural: Run, lexical: Run, qrels: dict[str, dict[str, int]],
                          grid: Sequence[float]) -> dict[str, float]:
    """The min-max blend with, on every query of `qrels`, the weight of `grid` that scores best on that query
    (analysis only: it reads the labels; no query-adaptive weight can beat it). {'ndcg@10', 'share_best_at_half':
    the share of queries where 0.5 is already among the best weights}."""
    curves = np.array([list(per_query_ndcg(qrels, minmax_blend(neural, lexical, weight=float(w))).values())
                       for w in grid])
    half = int(np.argmin(np.abs(np.asarray(grid) - 0.5)))
    return {"ndcg@10": float(curves.max(axis=0).mean()),
            "share_best_at_half": float(np.mean(curves[half] >= curves.max(axis=0) - 1e-12))}


def learned_fusion(neural: dict[str, Run], lexical: dict[str, Run], qrels: dict[str, dict[str, dict[str, int]]],
                   top_grade: int) -> dict[str, float]:
    """A pointwise learned blend, for comparison with the single-weight blends: sklearn's
    HistGradientBoostingRegressor maps (neural similarity, BM25 min-max) to the grade, fitted on every candidate
    of the 'dev' queries (an unjudged candidate counts grade 0, as in NDCG), and ranks the 'test' candidates.
    {'ndcg@10' on test, 'n_dev_rows'}."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    def rows(part: str) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
        keys, features, grades = [], [], []
        lexical_mm = minmax(lexical[part])
        for qid, ranked in neural[part].items():
            for pid, similarity in ranked.items():
                keys.append((qid, pid))
                features.append((similarity, lexical_mm.get(qid, {}).get(pid, 0.0)))
                grades.append(qrels[part].get(qid, {}).get(pid, 0))
        return keys, np.asarray(features, dtype=float), np.asarray(grades, dtype=float)

    _, dev_x, dev_y = rows("dev")
    model = HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, random_state=0)
    model.fit(dev_x, dev_y)
    test_keys, test_x, _ = rows("test")
    run: Run = {}
    for (qid, pid), score in zip(test_keys, model.predict(test_x)):
        run.setdefault(qid, {})[pid] = float(score)
    return {"ndcg@10": retrieval_metrics(qrels["test"], run, top_grade)["ndcg@10"], "n_dev_rows": float(len(dev_y))}


def paired_p_values(held_out: LabelledPairs, reports: Sequence[RetrievalReport], baseline: str,
                    metric: str = "ndcg@10") -> dict[str, float]:
    """{system: p} of a two-sided paired t-test (ranx.compare) of each system's per-query `metric`
    against the `baseline` system's, over the held-out queries both were evaluated on."""
    from ranx import Qrels, compare

    qrels = qrels_from_pairs(held_out.frame)
    runs = [ranx_run(qrels, r.run, r.system) for r in reports]
    report = compare(Qrels(qrels), runs, metrics=[metric], stat_test="student", make_comparable=True).to_dict()
    return {r.system: float(report[baseline]["comparisons"][r.system][metric]) for r in reports if r.system != baseline}


def relative_lift(value: float, baseline: float) -> float:
    return (value - baseline) / baseline if baseline else float("nan")


def reports_table(reports: Sequence[RetrievalReport], baseline: str | None = None,
                  p_values: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per system: metrics, adjacent AUCs, the relative NDCG@10 lift over `baseline`, and
    `p_values` (from `paired_p_values` against that baseline) when given."""
    rows = []
    base = next((r.metrics["ndcg@10"] for r in reports if r.system == baseline), None)
    for report in reports:
        row = {"system": report.system, **{k: v for k, v in report.metrics.items() if not k.startswith("n_")}}
        row.update({f"auc {k}": v for k, v in report.adjacent_auc.items()})
        if base is not None:
            row["ndcg@10 lift"] = relative_lift(report.metrics["ndcg@10"], base)
        if p_values is not None:
            row["p"] = p_values.get(report.system, float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)
