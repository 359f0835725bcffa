"""Stage 2 ablation on Home Depot: which parts of the multi-class circle loss earn its lift over Stage 1.

    python -m bench.bench_stage2_ablation [--quick]

Same sample, split, Stage 1 and settings as bench_retrieval. Every variant starts from the same
Stage 1 model, trains the same number of steps on the same batches (same seed) with the same hard
negatives (mined once with Stage 1), and is ranked over the whole product set for the held-out
queries. The control trains Stage 1's loss for those extra steps, so "Stage 2 beats the control"
says the circle loss, not the extra training, makes the difference. p: two-sided paired t-test of
per-query NDCG@10 (ranx.compare) against Stage 1 and against the control.

Cost on the 2-core CPU: --quick (bench_retrieval's quick sample, 90 steps per run) about 55 min; the full
size (its full sample, 300 steps per run) about 3 h.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_retrieval import prepare_sample, sample_settings, train_stage1, zero_shot
from bench.common import write_result
from trainer.evaluation import evaluate_systems, paired_p_values, relative_lift
from trainer.model import TwoTowerModel
from trainer.train import TrainConfig, train_model, with_hard_negatives

NAME = "stage2_ablation"
STAGE1 = "Stage 1"
CONTROL = "control: Stage 1 loss, same extra steps"
DEFAULT = "Stage 2 (gamma 32, margin 0.1 per grade gap, in-batch = lowest grade)"
VARIANTS: dict[str, dict[str, Any]] = {  # name -> TrainConfig overrides of the stage 2 run
    CONTROL: {"stage": "stage1"},
    DEFAULT: {},
    "Stage 2, in-batch products ignored": {"in_batch_negatives": False},
    "Stage 2, gamma 16": {"gamma": 16.0},
    "Stage 2, margin 0.05 per grade gap": {"margin": 0.05},
}


def main(argv: list[str] | None = None) -> None:
    quick, settings = sample_settings(NAME, __doc__.splitlines()[0], argv)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        sample = prepare_sample(settings, folder)
        stage1, stage1_timing = train_stage1(sample, folder)
        training = {STAGE1: stage1_timing}
        stage2_config = TrainConfig(stage="stage2", **sample.common)
        started = time.perf_counter()
        with_negatives = with_hard_negatives(stage1, sample.train, sample.products, stage2_config)
        mining_s = time.perf_counter() - started
        systems: dict[str, TwoTowerModel] = {"zero-shot MiniLM": zero_shot(), STAGE1: stage1}
        for index, (variant, overrides) in enumerate(VARIANTS.items()):
            model = TwoTowerModel.from_pretrained(folder / "stage1")
            config = TrainConfig(**{**sample.common, "stage": "stage2", **overrides})
            training[variant] = train_model(model, with_negatives, config, folder / f"variant{index}").metrics
            systems[variant] = model
        reports = evaluate_systems(sample.held_out, sample.products, systems)
        p_vs_stage1 = paired_p_values(sample.held_out, reports, STAGE1)
        p_vs_control = paired_p_values(sample.held_out, reports, CONTROL)
    ndcg = {r.system: r.metrics["ndcg@10"] for r in reports}
    zero = ndcg["zero-shot MiniLM"]
    figures = []
    for report in reports:
        system = report.system
        anchor = f"Stage 1 {ndcg[STAGE1]:.4f}, zero-shot {zero:.4f} (same run)"
        if system in VARIANTS:
            anchor += f"; vs Stage 1 {relative_lift(ndcg[system], ndcg[STAGE1]):+.2%} (p {p_vs_stage1[system]:.3f})"
        if system in VARIANTS and system != CONTROL:
            anchor += f"; vs control {relative_lift(ndcg[system], ndcg[CONTROL]):+.2%} (p {p_vs_control[system]:.3f})"
        figures.append({"name": f"NDCG@10, {system}", "value": round(ndcg[system], 4), "unit": "NDCG@10",
                        "target": "> control" if system == DEFAULT else "", "anchor": anchor})
    figures.append({"name": "Stage 2 (default) > control (NDCG@10)", "value": bool(ndcg[DEFAULT] > ndcg[CONTROL]),
                    "unit": "bool", "target": "true", "anchor": f"{ndcg[DEFAULT]:.4f} vs {ndcg[CONTROL]:.4f}, "
                                                               f"p {p_vs_control[DEFAULT]:.3f}"})
    n_q, n_p = int(reports[0].metrics["n_queries"]), int(reports[0].metrics["n_products"])
    data = (f"../shared/data/homedepot/train.csv: {settings['queries']} sampled queries, {n_p} products ranked, "
            f"{n_q} held-out queries (query-disjoint), {len(sample.train)} training pairs "
            f"+ {len(with_negatives) - len(sample.train)} hard negatives mined with Stage 1 in {mining_s:.0f} s")
    write_result(NAME, quick, data, figures, systems=[r.as_dict() for r in reports], training=training,
                 p_vs_stage1=p_vs_stage1, p_vs_control=p_vs_control, settings=settings)


if __name__ == "__main__":
    main()
