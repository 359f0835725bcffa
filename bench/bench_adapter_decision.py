"""The adapter alone, labelling by argmax and by its own dev decision, for adapters a `bench_finetune` run kept.

`mnr finetune` now fits the adapter's decision on dev (`annotator.finetune.adapter_decision`: cut-points on the
expected grade where they beat argmax under cross-fitting). Adapters trained before that carry none; this
benchmark gives them one the same way and measures both decisions on the same test pairs as `bench_finetune`
(same splits, same 1,000 test and at most 1,000 dev pairs), beside the text baseline by argmax and by its
own dev decision. It scores each adapter on dev and test (about 5-10 minutes per adapter on 2 cores).

    python -m bench.bench_adapter_decision --adapters /work/scratch/adapters_mh \
        --runs crowdflower-random,crowdflower-query,homedepot-random

Each run is ``<dataset>-<split>``, a folder of ``--adapters`` (`bench_finetune --keep-adapters`). Without them
(as `bench.run_all` calls it) it measures nothing and leaves the last result in place.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

from annotator import stack as st  # noqa: E402
from annotator.calibration import apply_temperature  # noqa: E402
from annotator.decision import choose_labels, read_decision  # noqa: E402
from annotator.finetune import fit_adapter_decision, read_meta  # noqa: E402
from annotator.text_baseline import class_probs  # noqa: E402
from bench.bench_finetune import (  # noqa: E402
    DATASETS, FULL, PRETTY, READERS, adapter_logprobs, baseline_labels_by_dev_decision, metrics_of, split_data,
)
from bench.common import skip, write_result  # noqa: E402

NAME = "adapter_decision"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=Path, default=None, help="A `bench_finetune --keep-adapters` folder.")
    parser.add_argument("--runs", default="", help="Comma-separated <dataset>-<split> folders in --adapters.")
    parser.add_argument("--quick", action="store_true", help="Accepted for bench.run_all; without --adapters "
                        "there is nothing to measure and nothing is written.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--result-name", default=NAME)
    return parser.parse_args()


def measure_run(adapter: Path, dataset: str, split: str) -> dict[str, Any]:
    from annotator.models import pull

    data = split_data(dataset, split, FULL)
    policy, labels, grades, scale = data.policy, data.labels, data.grades, data.scale
    train, dev, test = data.train, data.dev, data.test
    meta = read_meta(adapter)
    model_dir = str(pull(meta["base_model"]))
    test_logprobs, test_s = adapter_logprobs(model_dir, adapter, policy, test, judged_pool=train)
    dev_logprobs, dev_s = adapter_logprobs(model_dir, adapter, policy, dev, judged_pool=train)
    test_probs = apply_temperature(test_logprobs, meta["temperature"])
    dev_probs = apply_temperature(dev_logprobs, meta["temperature"])
    # the adapter's own record when it has one (trained since the decision existed), else fitted as finetune does
    decision = meta.get("decision") or fit_adapter_decision(dev_probs, dev["label"].map(labels.index).to_numpy(),
                                                            grades, dev["query_id"].tolist())
    cutoffs = read_decision(decision, len(labels))
    baseline = st.fit_lexical(train, train["label"].map(labels.index).to_numpy())
    baseline_probs = class_probs(baseline, test[["query", "title"]], len(labels))
    baseline_chosen, baseline_decision = baseline_labels_by_dev_decision(baseline, dev, baseline_probs, labels, grades)
    qwk = lambda probs, chosen=None: metrics_of(probs, test, labels, grades, scale, chosen)["qwk"]  # noqa: E731
    report = {"adapter": str(adapter), "test_pairs": len(test), "dev_pairs": len(dev),
              "tfidf_linear": qwk(baseline_probs), "tfidf_linear_decided": qwk(baseline_probs, baseline_chosen),
              "tfidf_linear_decision": baseline_decision, "adapter_argmax": qwk(test_probs),
              "adapter_decided": qwk(test_probs, choose_labels(test_probs, *cutoffs) if cutoffs else None),
              "adapter_decision": decision.get("dev_report", decision), "score_seconds": round(test_s + dev_s, 1)}
    print(f"[{dataset}/{split}] " + ", ".join(f"{k} {report[k]:.4f}" for k in
                                              ("tfidf_linear", "tfidf_linear_decided", "adapter_argmax",
                                               "adapter_decided")), flush=True)
    return report


def figures_of(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    figures = []
    for run, report in reports.items():
        dataset, split = run.split("-", 1)
        where = f"{PRETTY[dataset]} {split} split QWK"
        anchor = (f"same {report['test_pairs']} test pairs as bench_finetune; adapter {report['adapter']}; "
                  f"TF-IDF + linear {report['tfidf_linear']:.4f}, by its dev decision {report['tfidf_linear_decided']:.4f}")
        for key, name, target in (
                ("adapter_argmax", "adapter alone, argmax", ">= 90% of TF-IDF + linear (argmax)"),
                ("adapter_decided", "adapter alone, its dev decision", ">= 90% of TF-IDF + linear by its dev decision")):
            baseline = report["tfidf_linear" if key == "adapter_argmax" else "tfidf_linear_decided"]
            figures.append({"name": f"{where}, {name}", "value": round(report[key], 4), "unit": "QWK",
                            "target": f"{target}: {report[key] / baseline:.0%}", "anchor": anchor})
    return figures


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if args.adapters is None or not runs:  # bench.run_all: keep the result a real run wrote
        print("bench_adapter_decision: give --adapters DIR --runs <dataset>-<split>,...; nothing measured")
        return
    for run in runs:
        dataset = run.split("-", 1)[0]
        if dataset not in DATASETS or not (args.adapters / run).is_dir():
            sys.exit(f"{args.adapters / run}: no such adapter folder (runs are <dataset>-<split>, e.g. homedepot-random)")
        if READERS[dataset]() is None:
            skip(args.result_name, False, "../shared/data is absent")
    reports: dict[str, dict[str, Any]] = {}
    for run in runs:
        dataset, split = run.split("-", 1)
        reports[run] = measure_run(args.adapters / run, dataset, split)
        write_result(args.result_name, False, "../shared/data, the splits of bench_finetune", figures_of(reports),
                     runs=reports, command=" ".join(["python -m bench.bench_adapter_decision", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
