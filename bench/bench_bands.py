"""Score bands and hybrid retrieval on Home Depot: zero-shot MiniLM, Stage 1 and Stage 2 side by side.

    python -m bench.bench_bands [--quick]

Data and training as bench_retrieval (its sample, split and training code; Stage 2 is its variant (b):
the human labels plus assumed-irrelevant hard negatives, no LLM relabels yet). For each model, on
the held-out queries' labelled pairs (`trainer.bands`): per-grade similarity quantiles, adjacent-grade
AUC and overlap, the thresholds (Youden) with their precision, that precision when the thresholds
are fitted on one half of the queries and applied to the other, and on head vs tail queries (head:
the half with the most judged pairs; Home Depot has no traffic counts).
Hybrid (`trainer.hybrid`, Stage 2 + stemmed BM25): the held-out queries are halved into dev (bands
and blend weight) and test (the table).
Targets (issue #20): Stage 2's adjacent AUCs beat zero-shot's on every boundary; split-half precision
within 5 points; the calibrated blend beats the untuned 50/50 min-max blend by >= 3% NDCG@10, and
beats BM25 and neural alone.
Quick mode trains each stage for far fewer steps than bench_retrieval (see settings in the JSON).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.bench_retrieval import prepare_sample, sample_settings, train_stage, train_stage1, zero_shot
from bench.common import write_result
from trainer.evaluation import dev_test_split, evaluate_hybrid, model_bands, paired_p_values, relative_lift
from trainer.model import TwoTowerModel
from trainer.train import TrainConfig

NAME = "bands"
OVERRIDES = {  # on top of bench_retrieval's quick / full settings
    True: {"queries": 800, "holdout": 0.4, "max_heldout": 300, "max_steps": 10},
    False: {},
}
CALIBRATED, FIFTY, RRF = "hybrid: calibrated (dev weight)", "hybrid: min-max 50/50", "hybrid: RRF"
NOTES = {  # what each figure measured against the untuned blend is
    "calibrated blend with the best weight on the test queries": "a ceiling, reads the test labels",
    "minmax blend with the best weight on the test queries": "a ceiling, reads the test labels",
    "min-max blend with the best weight per test query": "a ceiling for any query-adaptive weight, reads the test labels",
    "learned pointwise blend": "gradient boosting on both scores, fitted on dev",
}


def band_figures(reports: dict[str, dict]) -> list[dict]:
    figures = []
    for system, report in reports.items():
        for boundary, auc in report["adjacent_auc"].items():
            figures.append({"name": f"adjacent AUC {boundary}, {system}", "value": round(auc, 4), "unit": "AUC",
                            "target": "Stage 2 > zero-shot" if system == "Stage 2" else "",
                            "anchor": f"overlap {report['adjacent_overlap'][boundary]:.3f}"})
        gap = max(h["gap"] for h in report["split_half"].values())
        figures.append({"name": f"split-half threshold precision gap (max over boundaries), {system}",
                        "value": round(gap, 4), "unit": "precision", "target": "<= 0.05",
                        "anchor": "thresholds fitted on half A of the held-out queries, precision on half B"})
        repeated = report["split_half_repeated"]
        figures.append({"name": f"split-half threshold precision gap, mean over {max(r['n_halvings'] for r in repeated.values())} "
                                f"halvings (max over boundaries), {system}",
                        "value": round(max(r["mean_gap"] for r in repeated.values()), 4), "unit": "precision",
                        "target": "<= 0.05",
                        "anchor": "largest single halving: " + ", ".join(f"{b} {r['max_gap']:.3f}" for b, r in repeated.items())})
        head_tail = report["head_tail"]
        gaps = [abs(head_tail["head"][b]["precision"] - head_tail["tail"][b]["precision"]) for b in head_tail["head"]]
        figures.append({"name": f"head vs tail threshold precision gap (max over boundaries), {system}",
                        "value": round(max(gaps), 4), "unit": "precision", "target": "",
                        "anchor": "head: the half of the queries with the most judged pairs"})
    zero, stage2 = reports["zero-shot"]["adjacent_auc"], reports["Stage 2"]["adjacent_auc"]
    figures.append({"name": "Stage 2 adjacent AUC > zero-shot on every boundary",
                    "value": bool(all(stage2[b] > zero[b] for b in zero)), "unit": "bool", "target": "true",
                    "anchor": ", ".join(f"{b}: {stage2[b]:.3f} vs {zero[b]:.3f}" for b in zero)})
    return figures


def hybrid_figures(reports: list, info: dict, p_calibrated_vs_fifty: float) -> list[dict]:
    by_name = {r.system: r.metrics for r in reports}
    figures = [{"name": f"hybrid table NDCG@10, {name}", "value": round(m["ndcg@10"], 4), "unit": "NDCG@10",
                "target": ">= 1.03 x min-max 50/50" if name == CALIBRATED else "",
                "anchor": f"recall@100 {m['recall@100']:.4f}; issue's reference (held-out HD): BM25 0.231, "
                          "Stage 2 0.229, 50/50 0.254, RRF 0.249"}
               for name, m in by_name.items()]
    lift = relative_lift(by_name[CALIBRATED]["ndcg@10"], by_name[FIFTY]["ndcg@10"])
    figures.append({"name": "calibrated blend over untuned 50/50 min-max blend (relative NDCG@10)",
                    "value": round(lift, 4), "unit": "relative", "target": ">= 0.03",
                    "anchor": f"paired p {p_calibrated_vs_fifty:.2g}; dev weight {info['calibrated_weight']:.2f}"})
    fifty = by_name[FIFTY]["ndcg@10"]

    def over_fifty(name: str, ndcg: float, anchor: str) -> dict:
        return {"name": f"{name} over untuned 50/50 (relative NDCG@10; {NOTES[name]})",
                "value": round(relative_lift(ndcg, fifty), 4), "unit": "relative", "target": "", "anchor": anchor}

    for blend, ceiling in info.get("test_ceiling", {}).items():
        figures.append(over_fifty(f"{blend} blend with the best weight on the test queries", ceiling["ndcg@10"],
                                  f"weight {ceiling['weight']:.2f}: no weight chosen on dev can do better"))
    if per_query := info.get("test_ceiling_per_query"):
        figures.append(over_fifty("min-max blend with the best weight per test query", per_query["ndcg@10"],
                                  f"0.5 already best on {per_query['share_best_at_half']:.0%} of the test queries"))
    if learned := info.get("learned_fusion"):
        figures.append(over_fifty("learned pointwise blend", learned["ndcg@10"],
                                  f"NDCG@10 {learned['ndcg@10']:.4f}; {int(learned['n_dev_rows'])} dev candidates, "
                                  "unjudged counted grade 0"))
    best_single = max(by_name["neural"]["ndcg@10"], by_name["BM25 (bm25s, stemmed)"]["ndcg@10"])
    figures.append({"name": "calibrated blend beats BM25 and neural alone (NDCG@10)",
                    "value": bool(by_name[CALIBRATED]["ndcg@10"] > best_single), "unit": "bool", "target": "true",
                    "anchor": f"{by_name[CALIBRATED]['ndcg@10']:.4f} vs best single {best_single:.4f}"})
    return figures


def main(argv: list[str] | None = None) -> None:
    quick, settings = sample_settings(NAME, __doc__.splitlines()[0], argv)
    settings = {**settings, **OVERRIDES[quick]}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        started = time.perf_counter()
        sample = prepare_sample(settings, folder)
        stage1, training1 = train_stage1(sample, folder)
        stage2 = TwoTowerModel.from_pretrained(folder / "stage1")
        training2 = train_stage(stage2, sample.train, sample.products, TrainConfig(stage="stage2", **sample.common),
                                folder / "stage2")
        timings["train_s"] = time.perf_counter() - started
        started = time.perf_counter()
        models = {"zero-shot": zero_shot(), "Stage 1": stage1, "Stage 2": stage2}
        band_reports = {system: model_bands(model, sample.held_out)[1] for system, model in models.items()}
        timings["bands_s"] = time.perf_counter() - started
        started = time.perf_counter()
        dev, test = dev_test_split(sample.held_out)
        hybrid, info = evaluate_hybrid(stage2, dev, test, sample.products, test_ceiling=True)
        p_values = paired_p_values(test, hybrid, FIFTY)
        timings["hybrid_s"] = time.perf_counter() - started
    n_q = sample.held_out.frame["query_id"].nunique()
    data = (f"../shared/data/homedepot/train.csv: {settings['queries']} sampled queries, {len(sample.products)} products, "
            f"{n_q} held-out queries ({len(sample.held_out)} labelled pairs; hybrid: {info['n_dev_queries']} dev / "
            f"{info['n_test_queries']} test), {len(sample.train)} training pairs")
    figures = band_figures(band_reports) + hybrid_figures(hybrid, info, p_values[CALIBRATED])
    write_result(NAME, quick, data, figures, bands=band_reports, hybrid=[r.as_dict() for r in hybrid],
                 hybrid_info=info, hybrid_p_vs_fifty=p_values, timings=timings,
                 training={"stage1": training1, "stage2": training2}, settings=settings,
                 labeler="none: Stage 2 is trained on human labels + assumed-irrelevant hard negatives (variant b)")


if __name__ == "__main__":
    main()
