"""Retrieval on Home Depot: BM25, zero-shot MiniLM, Stage 1 and Stage 2 on a query-disjoint held-out split.

    python -m bench.bench_retrieval [--quick]

Data: ../shared/data/homedepot/train.csv, a fixed sample of queries (all their judged pairs), ingested
with the homedepot preset (scheme graded3: relevant 2 / partial 1 / irrelevant 0) into a temporary
store. Queries are split by `trainer.data.is_held_out` (hash of the query id); Stage 1 trains on the
train queries' human labels plus HARD_NEGATIVES hard negatives per training query
(`trainer.train.with_hard_negatives`: its nearest products under Stage 1's start model that no one
judged for it, taken as irrelevant). Stage 2 starts from Stage 1, in four variants (issue #20):

- (a) the human labels only;
- (b) plus assumed-irrelevant hard negatives mined with Stage 1 (the earlier default);
- (c) plus relabelled mined pairs: RELABEL_PER_QUERY unjudged Stage 1 neighbours per training query,
  graded by a labeler with their confidence as the training weight; pairs below CONFIDENCE_FLOOR are
  left out (in the product they go to the review queue). The labeler here is the text baseline
  (`annotator.text_baseline`, TF-IDF + logistic regression) behind the same interface as the LLM's stack;
  every table says so. It is fitted on the training queries' human labels plus RANDOM_NEGATIVES random
  catalog products per training query that nobody judged for it, as irrelevant: judged pairs come from
  search results (7% irrelevant on Home Depot), so a labeler fitted on them alone calls 98% of mined
  neighbours partial or relevant, while a hand look at 25 queries' neighbours found about half unrelated.
  (c-) is (c) with that judged-pairs-only labeler, for comparison;
- (d) (c) after the audit removed flagged labels: not run, because the mined pairs have no engagement
  log (real or simulated with a known truth) for the audit to read.

Every system ranks the *whole* product set of the sample for each held-out query; p-values are paired
over held-out queries against (b). Target: (c) beats (b) with p < 0.05; Stage 2 (c) >= +30% NDCG@10
over zero-shot MiniLM.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import SAMPLE_SEED, command_line, parse_args, skip, write_result
from labelstore import Store
from labelstore.ingest import ingest_file
from labelstore.paths import shared_data_dir
from trainer.data import LabelledPairs, load_labelled_pairs, load_products
from trainer.evaluation import JUDGED_SUFFIX, evaluate_systems, paired_p_values, relative_lift
from trainer.model import TwoTowerModel
from annotator.text_baseline import tfidf_linear_probs
from trainer.mining import hard_negatives
from trainer.train import Relabels, TrainConfig, train_model, with_hard_negatives, with_relabels

NAME = "retrieval"
HARD_NEGATIVES = 5  # per training query, from its 30 nearest products
RELABEL_PER_QUERY = 5  # unjudged Stage 1 neighbours relabelled per training query, from its 30 nearest
CONFIDENCE_FLOOR = 0.5  # relabels less confident than this are left out of training (review queue)
RANDOM_NEGATIVES = 2  # random unjudged catalog products per training query the labeler learns as irrelevant
LABELER = ("text baseline (TF-IDF + logistic regression on the training queries' human labels and "
           f"{RANDOM_NEGATIVES} random catalog negatives per query), standing in for the LLM")
VARIANTS = {"a": "Stage 2 (a) human labels only", "b": "Stage 2 (b) + assumed-irrelevant negatives",
            "c": "Stage 2 (c) + relabelled mined pairs",
            "c-": "Stage 2 (c-) + mined pairs relabelled without random negatives"}
FIELDS = ("title",)
MAX_SEQ_LENGTH = 48
SETTINGS = {  # quick / full
    True: {"queries": 2000, "holdout": 0.25, "max_heldout": 400, "epochs": 1, "max_steps": 90},
    False: {"queries": 6000, "holdout": 0.2, "max_heldout": 1000, "epochs": 1, "max_steps": 300},
}


def sample_csv(source: Path, n_queries: int, out: Path) -> Path:
    """A CSV of all rows of `n_queries` sampled search terms (fixed seed), in a temporary folder."""
    frame = pd.read_csv(source, encoding="utf-8")
    terms = pd.Series(frame["search_term"].unique()).sample(n=n_queries, random_state=SAMPLE_SEED)
    frame[frame["search_term"].isin(set(terms))].to_csv(out, index=False)
    return out


def train_stage(model: TwoTowerModel, train: LabelledPairs, products: pd.DataFrame, config: TrainConfig,
                out: Path) -> dict[str, float]:
    """Add hard negatives mined with `model`, train it in place, save it to `out`; its timing metrics."""
    started = time.perf_counter()
    with_negatives = with_hard_negatives(model, train, products, config)
    mining_s = time.perf_counter() - started
    metrics = train_model(model, with_negatives, config, out).metrics
    return {**metrics, "hard_negatives_added": float(len(with_negatives) - len(train)), "mining_s": mining_s}


@dataclass
class Sample:
    """The benchmark's Home Depot sample: training pairs, held-out pairs, all products, shared train settings."""

    train: LabelledPairs
    held_out: LabelledPairs
    products: pd.DataFrame
    common: dict[str, Any]


def prepare_sample(settings: dict[str, Any], folder: Path) -> Sample:
    """Ingest the sample of ../shared/data/homedepot/train.csv into a store in `folder` and split it by query."""
    store = Store(folder / "bench.duckdb")
    ingest_file(store, sample_csv(shared_data_dir() / "homedepot" / "train.csv", settings["queries"], folder / "hd.csv"),
                preset="homedepot")
    pairs = load_labelled_pairs(store, "graded3", "homedepot", FIELDS)
    train, held_out = pairs.split(settings["holdout"], seed=0)
    keep = held_out.frame["query_id"].drop_duplicates().head(settings["max_heldout"])
    held_out.frame = held_out.frame[held_out.frame["query_id"].isin(set(keep))].reset_index(drop=True)
    common = {"scheme": "graded3", "dataset": "homedepot", "epochs": settings["epochs"],
              "max_steps": settings["max_steps"], "queries_per_batch": 16, "products_per_query": 12,
              "max_seq_length": MAX_SEQ_LENGTH, "product_fields": FIELDS, "learning_rate": 5e-5,
              "hard_negatives": HARD_NEGATIVES, "hard_negative_pool": 30}
    return Sample(train, held_out, load_products(store, "homedepot", FIELDS), common)


def zero_shot() -> TwoTowerModel:
    return TwoTowerModel.from_pretrained(product_fields=FIELDS, max_seq_length=MAX_SEQ_LENGTH)


def sample_settings(name: str, description: str, argv: list[str] | None) -> tuple[bool, dict[str, Any]]:
    """(quick, the sample settings) from the command line; records `name` as skipped when the data is absent."""
    args = parse_args(description, argv)
    root = shared_data_dir()
    if root is None or not (root / "homedepot" / "train.csv").is_file():
        skip(name, args.quick, "../shared/data/homedepot/train.csv is absent")
    return args.quick, SETTINGS[args.quick]


def train_stage1(sample: Sample, folder: Path) -> tuple[TwoTowerModel, dict[str, float]]:
    """Stage 1 from zero-shot MiniLM on the sample (with hard negatives), saved to `folder/stage1`."""
    stage1 = zero_shot()
    return stage1, train_stage(stage1, sample.train, sample.products, TrainConfig(stage="stage1", **sample.common),
                               folder / "stage1")


def mined_neighbours(stage1: TwoTowerModel, sample: Sample) -> tuple[pd.DataFrame, float]:
    """RELABEL_PER_QUERY unjudged Stage 1 neighbours per training query (of its 30 nearest), and the seconds taken."""
    started = time.perf_counter()
    mined = hard_negatives(stage1, sample.train.frame, sample.products, RELABEL_PER_QUERY, 30, relative_margin=None)
    return mined, time.perf_counter() - started


def random_negatives(train: pd.DataFrame, products: pd.DataFrame, per_query: int, seed: int = SAMPLE_SEED) -> pd.DataFrame:
    """`per_query` random products per training query that nobody judged for it, as (query, title) rows."""
    rng = np.random.default_rng(seed)
    judged = train.groupby("query_id")["product_id"].agg(set)
    titles, ids = products["product_text"].to_numpy(), products["product_id"].to_numpy()
    rows = []
    for query_id, query_text in train.drop_duplicates("query_id")[["query_id", "query_text"]].itertuples(index=False):
        draws = rng.choice(len(ids), size=min(len(ids), per_query + len(judged[query_id])), replace=False)
        rows += [(query_text, titles[i]) for i in draws if ids[i] not in judged[query_id]][:per_query]
    return pd.DataFrame(rows, columns=["query", "title"])


def relabelled_mined(sample: Sample, mined: pd.DataFrame, mining_s: float, negatives_per_query: int
                     ) -> tuple[LabelledPairs, dict[str, float]]:
    """The training pairs plus the `mined` neighbours graded by the labeler (weight: its confidence), those
    under CONFIDENCE_FLOOR left out; and the relabelling cost. The labeler also learns `negatives_per_query`
    random catalog products per training query as irrelevant (`random_negatives`)."""
    started = time.perf_counter()
    train = sample.train

    def texts(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"query": frame["query_text"].to_numpy(), "title": frame["product_text"].to_numpy()})
    grades = sorted(label.grade for label in train.scheme.labels)
    negatives = random_negatives(train.frame, sample.products, negatives_per_query)
    inputs = pd.concat([texts(train.frame), negatives], ignore_index=True)
    classes = np.concatenate([train.frame["grade"].to_numpy(), np.full(len(negatives), min(grades))])
    probs = tfidf_linear_probs(inputs, texts(mined), classes, len(grades))
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    low = confidence < CONFIDENCE_FLOOR
    relabels = Relabels(mined["pair_id"].tolist(), predicted, confidence, exclude=mined["pair_id"][low].tolist())
    mined = mined.assign(source="relabelled", label=[train.scheme.label_for_grade(int(g)) for g in predicted])
    pairs = with_relabels(LabelledPairs(train.scheme, pd.concat([train.frame, mined], ignore_index=True)), relabels)
    cost = {"mined_pairs": float(len(mined)), "relabelled_kept": float((~low).sum()), "below_floor": float(low.sum()),
            "mining_s": mining_s, "relabel_s": time.perf_counter() - started,
            "labeler_random_negatives": float(len(negatives)),
            **{f"relabelled_grade_{g}": float(((predicted == g) & ~low).sum()) for g in grades}}
    return pairs, cost


def train_variants(sample: Sample, stage1_dir: Path, stage1: TwoTowerModel, folder: Path
                   ) -> tuple[dict[str, TwoTowerModel], dict[str, dict[str, float]]]:
    """Stage 2 variants (a), (b), (c), (c-), each from Stage 1; their models and timing / relabelling figures."""
    models, timings = {}, {}
    no_negatives = TrainConfig(stage="stage2", **{**sample.common, "hard_negatives": 0})
    models["a"] = TwoTowerModel.from_pretrained(stage1_dir)
    timings["a"] = train_model(models["a"], sample.train, no_negatives, folder / "stage2a").metrics
    models["b"] = TwoTowerModel.from_pretrained(stage1_dir)
    timings["b"] = train_stage(models["b"], sample.train, sample.products, TrainConfig(stage="stage2", **sample.common),
                               folder / "stage2b")
    mined, mining_s = mined_neighbours(stage1, sample)
    for key, negatives in (("c", RANDOM_NEGATIVES), ("c-", 0)):
        relabelled, cost = relabelled_mined(sample, mined, mining_s, negatives)
        models[key] = TwoTowerModel.from_pretrained(stage1_dir)
        timings[key] = {**train_model(models[key], relabelled, no_negatives, folder / f"stage2{key}").metrics, **cost}
    return models, timings


def main(argv: list[str] | None = None) -> None:
    quick, settings = sample_settings(NAME, __doc__.splitlines()[0], argv)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        sample = prepare_sample(settings, folder)
        train, held_out, products = sample.train, sample.held_out, sample.products
        timings = {}
        stage1, timings["stage1"] = train_stage1(sample, folder)
        stage2, stage2_timings = train_variants(sample, folder / "stage1", stage1, folder)
        timings.update({f"stage2{key}": value for key, value in stage2_timings.items()})
        started = time.perf_counter()
        reports = evaluate_systems(held_out, products, {
            "BM25 (bm25s)": None,
            "zero-shot MiniLM": zero_shot(),
            "Stage 1 (grade SupCon)": stage1, **{VARIANTS[key]: model for key, model in stage2.items()}},
            condensed=True)
        eval_s = time.perf_counter() - started
        full = [r for r in reports if not r.system.endswith(JUDGED_SUFFIX)]
        condensed = [r for r in reports if r.system.endswith(JUDGED_SUFFIX)]
        p_vs_zero = paired_p_values(held_out, full, "zero-shot MiniLM")
        p_vs_stage1 = paired_p_values(held_out, full, "Stage 1 (grade SupCon)")
        p_vs_b = paired_p_values(held_out, full, VARIANTS["b"])
        p_vs_b_judged = paired_p_values(held_out, condensed, VARIANTS["b"] + JUDGED_SUFFIX)
    data = (f"../shared/data/homedepot/train.csv: {settings['queries']} sampled queries, "
            f"{int(reports[0].metrics['n_products'])} products ranked, {int(reports[0].metrics['n_queries'])} held-out "
            f"queries (query-disjoint), {len(train)} training pairs; relabeller: {LABELER}")
    # a quick run has its own file, so it never overwrites the full-size result
    write_result(f"{NAME}_variants_quick" if quick else NAME, quick, data,
                 figures_of(reports, timings, p_vs_zero, p_vs_stage1, p_vs_b, p_vs_b_judged),
                 command=command_line(NAME, quick),
                 systems=[r.as_dict() for r in reports], training=timings, labeler=LABELER,
                 eval_wall_s=eval_s, p_vs_zero_shot=p_vs_zero, p_vs_stage1=p_vs_stage1, p_vs_variant_b=p_vs_b,
                 p_vs_variant_b_judged_only=p_vs_b_judged,
                 settings={**settings, "hard_negatives_per_query": HARD_NEGATIVES,
                           "relabelled_per_query": RELABEL_PER_QUERY, "confidence_floor": CONFIDENCE_FLOOR,
                           "labeler_random_negatives_per_query": RANDOM_NEGATIVES,
                           "products_per_query": sample.common["products_per_query"]},
                 variant_d="not run: the mined pairs have no engagement log for the audit to read")


def figures_of(reports: list[Any], timings: dict[str, dict[str, float]], p_vs_zero: dict[str, float],
               p_vs_stage1: dict[str, float], p_vs_b: dict[str, float],
               p_vs_b_judged: dict[str, float]) -> list[dict[str, Any]]:
    by_name = {r.system: r.metrics for r in reports}
    n_q = int(reports[0].metrics["n_queries"])
    zero, stage1 = by_name["zero-shot MiniLM"], by_name["Stage 1 (grade SupCon)"]
    anchor = f"zero-shot MiniLM {zero['ndcg@10']:.4f} (same run); paper: +10-19% over its pretrained baseline"
    figures = [{"name": f"NDCG@10, {r.system}", "value": round(r.metrics["ndcg@10"], 4), "unit": "NDCG@10",
                "target": ">= +30% over zero-shot" if r.system == VARIANTS["c"] else "", "anchor": anchor}
               for r in reports]
    for key, system in VARIANTS.items():
        metrics = by_name[system]
        figures.append({"name": f"{system}: relative NDCG@10 lift over zero-shot",
                        "value": round(relative_lift(metrics["ndcg@10"], zero["ndcg@10"]), 4), "unit": "relative",
                        "target": ">= 0.30" if key == "c" else "", "anchor": "paper: 0.10-0.19"})
        figures.append({"name": f"{system}: Recall@100 / MRR", "value": round(metrics["recall@100"], 4),
                        "unit": "Recall@100", "target": "> Stage 1" if key == "c" else "",
                        "anchor": f"MRR {metrics['mrr']:.4f}; Stage 1 Recall@100 {stage1['recall@100']:.4f}"})
        figures.append({"name": f"p, NDCG@10 of {system.split(' +')[0].split(' human')[0]} vs Stage 1",
                        "value": float(f"{p_vs_stage1[system]:.2g}"), "unit": "p", "target": "",
                        "anchor": f"two-sided paired t-test over {n_q} held-out queries (ranx.compare)"})
        if key != "b":
            figures.append({"name": f"p, NDCG@10 of {system.split(' +')[0].split(' human')[0]} vs (b)",
                            "value": float(f"{p_vs_b[system]:.2g}"), "unit": "p",
                            "target": "< 0.05 and (c) above (b)" if key == "c" else "",
                            "anchor": f"(b) {by_name[VARIANTS['b']]['ndcg@10']:.4f}; paired over {n_q} held-out queries"})
    for key in ("b", "c", "c-"):
        system = VARIANTS[key]
        figures.append({"name": f"{system}: judged share of the top 10", "value": round(by_name[system]["judged@10"], 4),
                        "unit": "share", "target": "",
                        "anchor": "unjudged products count as irrelevant in NDCG@10; Stage 1 "
                                  f"{stage1['judged@10']:.4f}, zero-shot {zero['judged@10']:.4f}"})
    for key in ("c", "c-"):
        condensed = VARIANTS[key] + JUDGED_SUFFIX
        figures.append({"name": f"p, condensed NDCG@10 (judged products only) of ({key}) vs (b)",
                        "value": float(f"{p_vs_b_judged[condensed]:.2g}"), "unit": "p", "target": "",
                        "anchor": f"({key}) {by_name[condensed]['ndcg@10']:.4f}, "
                                  f"(b) {by_name[VARIANTS['b'] + JUDGED_SUFFIX]['ndcg@10']:.4f}; each ranking with "
                                  "the unjudged products removed (Sakai 2007), paired over the same queries"})
    figures.append({"name": "p, NDCG@10 of Stage 1 vs zero-shot", "value": float(f"{p_vs_zero['Stage 1 (grade SupCon)']:.2g}"),
                    "unit": "p", "target": "", "anchor": f"two-sided paired t-test over {n_q} held-out queries"})
    for key in ("c", "c-"):
        cost = timings[f"stage2{key}"]
        shares = "/".join(f"{int(cost[f'relabelled_grade_{g}'])}" for g in (2, 1, 0))
        figures.append({"name": f"relabelling cost of ({key})", "value": round(cost["mining_s"] + cost["relabel_s"], 1),
                        "unit": "s", "target": "",
                        "anchor": f"{int(cost['mined_pairs'])} mined pairs, {int(cost['relabelled_kept'])} kept "
                                  f"(relevant/partial/irrelevant {shares}), {int(cost['below_floor'])} below the floor "
                                  f"{CONFIDENCE_FLOOR}; labeler: text baseline with "
                                  f"{int(cost['labeler_random_negatives'])} random catalog negatives"})
    for stage in ("stage1", "stage2b", "stage2c", "stage2c-"):
        figures.append({"name": f"{stage} training throughput", "value": round(timings[stage]["train_pairs_per_s"], 1),
                        "unit": "pairs/s", "target": "",
                        "anchor": f"{int(timings[stage]['train_pairs_seen'])} pairs in {timings[stage]['train_wall_s']:.0f} s"})
    return figures


if __name__ == "__main__":
    main()
