"""Retrieval on Home Depot: BM25, zero-shot MiniLM, Stage 1 and Stage 2 on a query-disjoint held-out split.

    python -m bench.bench_retrieval [--quick]

Data: ../shared/data/homedepot/train.csv, a fixed sample of queries (all their judged pairs), ingested
with the homedepot preset (scheme graded3: relevant 2 / partial 1 / irrelevant 0) into a temporary
store. Queries are split by `trainer.data.is_held_out` (hash of the query id); Stage 1 trains on the
train queries' human labels, Stage 2 starts from Stage 1 and trains on the same labels (the paper
trains Stage 2 on LLM relabels of mined pairs; here the human labels stand in for them). Both stages
add HARD_NEGATIVES hard negatives per training query (`trainer.train.with_hard_negatives`: its nearest
products under the stage's start model that no one judged for it, taken as irrelevant). Every
system ranks the *whole* product set of the sample for each held-out query.
Target: Stage 2 >= +19% relative NDCG@10 over zero-shot MiniLM, and Stage 2 > Stage 1 > zero-shot.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.common import SAMPLE_SEED, parse_args, skip, write_result
from labelstore import Store
from labelstore.ingest import ingest_file
from labelstore.paths import shared_data_dir
from trainer.data import LabelledPairs, load_labelled_pairs, load_products
from trainer.evaluation import evaluate_systems, paired_p_values, relative_lift
from trainer.model import TwoTowerModel
from trainer.train import TrainConfig, train_model, with_hard_negatives

NAME = "retrieval"
HARD_NEGATIVES = 5  # per training query, from its 30 nearest products
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


def main(argv: list[str] | None = None) -> None:
    quick, settings = sample_settings(NAME, __doc__.splitlines()[0], argv)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        sample = prepare_sample(settings, folder)
        train, held_out, products, common = sample.train, sample.held_out, sample.products, sample.common
        timings = {}
        stage1, timings["stage1"] = train_stage1(sample, folder)
        stage2 = TwoTowerModel.from_pretrained(folder / "stage1")
        timings["stage2"] = train_stage(stage2, train, products, TrainConfig(stage="stage2", **common), folder / "stage2")
        started = time.perf_counter()
        reports = evaluate_systems(held_out, products, {
            "BM25 (bm25s)": None,
            "zero-shot MiniLM": zero_shot(),
            "Stage 1 (grade SupCon)": stage1, "Stage 2 (multi-class circle)": stage2})
        eval_s = time.perf_counter() - started
        p_vs_zero = paired_p_values(held_out, reports, "zero-shot MiniLM")
        p_vs_stage1 = paired_p_values(held_out, reports, "Stage 1 (grade SupCon)")
    by_name = {r.system: r for r in reports}
    n_q, n_p = int(reports[0].metrics["n_queries"]), int(reports[0].metrics["n_products"])
    zero = by_name["zero-shot MiniLM"].metrics["ndcg@10"]
    s1, s2 = by_name["Stage 1 (grade SupCon)"].metrics["ndcg@10"], by_name["Stage 2 (multi-class circle)"].metrics["ndcg@10"]
    figures = [{"name": f"NDCG@10, {r.system}", "value": round(r.metrics["ndcg@10"], 4), "unit": "NDCG@10",
                "target": ">= +19% over zero-shot" if "Stage 2" in r.system else "",
                "anchor": f"zero-shot MiniLM {zero:.4f} (same run); paper: +10-19% over its pretrained baseline"}
               for r in reports]
    figures.append({"name": "Stage 2 relative NDCG@10 lift over zero-shot", "value": round(relative_lift(s2, zero), 4),
                    "unit": "relative", "target": ">= 0.19", "anchor": "paper: 0.10-0.19"})
    figures.append({"name": "Stage 2 > Stage 1 > zero-shot (NDCG@10)", "value": bool(s2 > s1 > zero), "unit": "bool",
                    "target": "true", "anchor": f"{s2:.4f} / {s1:.4f} / {zero:.4f}"})
    for system, baseline, p_values in (("Stage 1 (grade SupCon)", "zero-shot", p_vs_zero),
                                       ("Stage 2 (multi-class circle)", "zero-shot", p_vs_zero),
                                       ("Stage 2 (multi-class circle)", "Stage 1", p_vs_stage1)):
        figures.append({"name": f"p, NDCG@10 of {system.split(' (')[0]} vs {baseline}", "value": float(f"{p_values[system]:.2g}"),
                        "unit": "p", "target": "",
                        "anchor": f"two-sided paired t-test over {n_q} held-out queries (ranx.compare)"})
    for stage in ("stage1", "stage2"):
        figures.append({"name": f"{stage} training throughput", "value": round(timings[stage]["train_pairs_per_s"], 1),
                        "unit": "pairs/s", "target": "",
                        "anchor": f"{int(timings[stage]['train_pairs_seen'])} pairs in {timings[stage]['train_wall_s']:.0f} s"})
    data = (f"../shared/data/homedepot/train.csv: {settings['queries']} sampled queries, {n_p} products ranked, "
            f"{n_q} held-out queries (query-disjoint), {len(train)} training pairs")
    write_result(NAME, quick, data, figures, systems=[r.as_dict() for r in reports], training=timings,
                 eval_wall_s=eval_s, p_vs_zero_shot=p_vs_zero, p_vs_stage1=p_vs_stage1,
                 settings={**settings, "hard_negatives_per_query": HARD_NEGATIVES,
                           "products_per_query": common["products_per_query"]})


if __name__ == "__main__":
    main()
