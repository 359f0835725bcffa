"""Zero-shot SmolLM2-135M against LoRA-fine-tuned SmolLM2-135M, beside a TF-IDF + linear baseline.

Home Depot under the `home-improvement` policy (scheme graded3; metric: RMSE of the expected
rating, rating = grade + 1, against the raw mean rating) and CrowdFlower under the `graded4` policy
(scheme graded4, median rating 4/3/2/1 -> perfect/good/fair/irrelevant = grade 3/2/1/0; metric:
quadratic-weighted kappa). Each file
is split by query: test (20% of queries, a fixed sample of it is scored), dev (10%, early stopping
and the temperature), train (the rest). The LoRA run gets a wall-clock budget (`--minutes`); the
baseline trains on the whole train split in seconds. Early stopping is off, so each run uses its
whole budget; the best adapter by dev QWK is kept.

Scaling with the number of training pairs: every pair is seen at most once (the pool is larger than
the budget can get through) and the learning rate is constant after warm-up, so the first n/16 steps
of a run are a one-epoch run on n pairs. The dev evaluations of each run (every 20 steps) are the
points of the scaling curve: pairs seen, training seconds, dev QWK and RMSE.

    python -m bench.bench_finetune [--quick] [--minutes M] [--test-pairs N]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.model_selection import GroupShuffleSplit  # noqa: E402

from annotator.evaluation import evaluate_labels  # noqa: E402
from annotator.finetune import (  # noqa: E402
    FinetuneArgs,
    encode_examples,
    finetune,
    load_lora_model,
    load_tokenizer,
    score_label_logprobs,
    subsample,
)
from annotator.calibration import apply_temperature  # noqa: E402
from annotator.prompts import load_prompt_policy  # noqa: E402
from annotator.scoring import label_token_ids  # noqa: E402
from bench.common import command_line, read_crowdflower, read_homedepot, skip, tfidf_linear_probs, write_result  # noqa: E402

NAME = "finetune"
SEED = 2602
# dataset -> (policy, rating source, headline metric, public anchors)
DATASETS: dict[str, tuple[str, str, str, str]] = {
    "homedepot": ("home-improvement", "homedepot", "rmse_rating",
                  "Kaggle Home Depot winner RMSE 0.431 (3rd place ensemble 0.4327, its best single model 0.438)"),
    "crowdflower": ("graded4", "crowdflower", "qwk",
                    "Kaggle CrowdFlower winner QWK 0.7219 (35-model ensemble); best single model 0.7077"),
}
READERS = {"homedepot": read_homedepot, "crowdflower": read_crowdflower}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small budget: a few minutes per dataset.")
    parser.add_argument("--minutes", type=float, default=None, help="LoRA training budget per dataset (default 3 quick, 8 full).")
    parser.add_argument("--test-pairs", type=int, default=None, help="Test pairs scored per dataset (default 60 quick, 400 full).")
    parser.add_argument("--datasets", default="homedepot,crowdflower")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    return parser.parse_args()


def labelled_frame(dataset: str, policy_name: str, rating_source: str) -> pd.DataFrame | None:
    """The dataset as pair_id, query_id, query, title, description, brand, raw_rating, label."""
    raw = READERS[dataset]()
    if raw is None:
        return None
    scheme = load_prompt_policy(policy_name).scheme
    frame = raw.assign(raw_rating=raw["rating"], label=[scheme.map_rating(rating_source, r) for r in raw["rating"]])
    frame["query_id"] = frame["query"].str.strip().str.lower()
    frame["pair_id"] = [f"{dataset}-{i}" for i in range(len(frame))]
    return frame


def split_three(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, dev, test) by query: test 20% of queries, dev 10% of the rest."""
    def cut(part: pd.DataFrame, share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        keep, held = next(GroupShuffleSplit(n_splits=1, test_size=share, random_state=SEED)
                          .split(part, groups=part["query_id"]))
        return part.iloc[keep].reset_index(drop=True), part.iloc[held].reset_index(drop=True)

    rest, test = cut(frame, 0.2)
    train, dev = cut(rest, 0.1)
    return train, dev, test


def metrics_of(probs: np.ndarray, frame: pd.DataFrame, labels: list[str], grades: list[int],
               scale: tuple[float, float]) -> dict[str, Any]:
    truth = np.array([labels.index(label) for label in frame["label"]])
    result = evaluate_labels(truth, probs, grades, frame["raw_rating"].to_numpy(dtype=float), label_names=labels,
                             rating_scale=scale)
    return {k: result[k] for k in ("n", "accuracy", "macro_f1", "qwk", "rmse_rating", "ece", "confusion_matrix")}


def llm_probs(model: Any, tokenizer: Any, policy: Any, frame: pd.DataFrame, temperature: float) -> tuple[np.ndarray, float]:
    """Label probabilities of ``frame`` from a (LoRA) model, and the scoring time in seconds."""
    start = time.monotonic()
    examples = encode_examples(tokenizer, policy, frame)
    logprobs = score_label_logprobs(model, examples, label_token_ids(tokenizer, policy.answer_options()),
                                    tokenizer.pad_token_id, batch_size=32)
    return apply_temperature(logprobs, temperature), time.monotonic() - start


def run_dataset(dataset: str, model_dir: str, minutes: float, test_pairs: int, work: Path, quick: bool) -> dict[str, Any]:
    policy_name, rating_source, headline, anchor = DATASETS[dataset]
    policy = load_prompt_policy(policy_name)
    labels = policy.scheme.label_names
    grades = [policy.scheme.grades[name] for name in labels]
    scale = tuple(float(x) for x in policy.scheme.rating_maps[rating_source].scale)
    frame = labelled_frame(dataset, policy_name, rating_source)
    train, dev, test = split_three(frame)
    test_sample = subsample(test, test_pairs, SEED)
    report: dict[str, Any] = {"policy": policy_name, "scheme": policy.scheme.name, "headline_metric": headline,
                              "anchor": anchor, "pairs": len(frame), "train_pairs_available": len(train),
                              "dev_pairs": len(dev), "test_pairs_scored": len(test_sample)}

    start = time.monotonic()
    baseline_probs = tfidf_linear_probs(train, test_sample, train["label"].map(labels.index).to_numpy(), len(labels))
    report["tfidf_linear"] = {**metrics_of(baseline_probs, test_sample, labels, grades, scale),
                              "train_pairs": len(train), "seconds": round(time.monotonic() - start, 1)}
    print(f"[{dataset}] tfidf+linear: {report['tfidf_linear'][headline]:.4f}", flush=True)

    tokenizer = load_tokenizer(model_dir)
    base = load_lora_model(model_dir, FinetuneArgs())  # a fresh LoRA adapter is the identity: zero-shot
    probs, seconds = llm_probs(base, tokenizer, policy, test_sample, 1.0)
    report["zero_shot"] = {**metrics_of(probs, test_sample, labels, grades, scale), "score_seconds": round(seconds, 1)}
    print(f"[{dataset}] zero-shot: {report['zero_shot'][headline]:.4f} ({seconds:.0f}s)", flush=True)
    del base

    args = FinetuneArgs(max_minutes=minutes, eval_every=10 if quick else 20, patience=10_000, max_dev=32 if quick else 150,
                        max_epochs=1.0, batch_size=16, learning_rate=1e-3, select_metric="qwk", seed=SEED)
    dev_sample = subsample(dev, args.max_dev, SEED)
    llm_train = subsample(train, 800 if quick else 8000, SEED)  # more than the budget can get through
    result = finetune(llm_train, dev_sample, policy, model_dir, work / f"{dataset}-lora",
                      args, base_model_name="smollm2", rating_scale=scale,
                      progress=lambda r: print(f"[{dataset}] step {r['step']} loss {r['train_loss']:.3f} "
                                               f"dev qwk {r['qwk']:.3f} acc {r['accuracy']:.3f} {r['elapsed_s']:.0f}s",
                                               flush=True))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    import torch

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(work / f"{dataset}-lora"))
    from annotator.pair_form import policy_for_adapter

    # the adapter is scored with the prompt it was trained on (its recorded pair form)
    probs, seconds = llm_probs(tuned, tokenizer, policy_for_adapter(policy, result.meta), test_sample,
                               result.meta["temperature"])
    report["lora"] = {**metrics_of(probs, test_sample, labels, grades, scale), "score_seconds": round(seconds, 1),
                      "budget_minutes": minutes, "steps": result.meta["steps"],
                      "train_pairs_seen": min(result.meta["steps"] * args.batch_size, len(llm_train)),
                      "batch_size": args.batch_size, "dev_pairs": len(dev_sample),
                      "train_seconds": result.meta["train_seconds"], "stop_reason": result.meta["stop_reason"],
                      "temperature": result.meta["temperature"], "history": result.history}
    print(f"[{dataset}] LoRA: {report['lora'][headline]:.4f} after {result.meta['steps']} steps", flush=True)
    return report


def scaling_points(dataset: str, report: dict[str, Any], points: int = 3) -> list[dict[str, Any]]:
    """`points` dev evaluations of the run, evenly spread over it: pairs seen (one epoch at most, so
    the training-set size of an equivalent one-epoch run), seconds, dev QWK and RMSE of the grade."""
    history = report["lora"]["history"]
    if not history:
        return []
    picks = sorted({round(i * (len(history) - 1) / max(points - 1, 1)) for i in range(points)})
    batch = report["lora"]["batch_size"]
    return [{"dataset": dataset, "train_pairs": history[i]["step"] * batch, "steps": history[i]["step"],
             "seconds": history[i]["elapsed_s"], "dev_qwk": history[i]["qwk"], "dev_rmse_grade": history[i]["rmse_grade"],
             "dev_accuracy": history[i]["accuracy"], "dev_pairs": report["lora"]["dev_pairs"]} for i in picks]


def figures_of(reports: dict[str, dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    figures = []
    for dataset, report in reports.items():
        metric = report["headline_metric"]
        unit = "RMSE (rating)" if metric == "rmse_rating" else "QWK"
        pretty = {"homedepot": "Home Depot", "crowdflower": "CrowdFlower"}[dataset]
        baseline = report["tfidf_linear"][metric]
        anchor = f"TF-IDF + linear {baseline:.4f} (same run, same test pairs); {report['anchor']}"
        lora = report["lora"]
        figures.append({"name": f"{pretty} {unit}, zero-shot SmolLM2-135M", "value": round(report["zero_shot"][metric], 4),
                        "unit": unit, "target": "baseline to beat", "anchor": anchor})
        figures.append({"name": f"{pretty} {unit}, LoRA SmolLM2-135M ({lora['budget_minutes']:g} min CPU budget, "
                                f"{lora['steps']} steps)", "value": round(lora[metric], 4), "unit": unit,
                        "target": "better than TF-IDF + linear", "anchor": anchor})
        figures.append({"name": f"{pretty} {unit}, TF-IDF + linear", "value": round(baseline, 4), "unit": unit,
                        "target": "reference", "anchor": report["anchor"]})
    for point in points:
        pretty = {"homedepot": "Home Depot", "crowdflower": "CrowdFlower"}[point["dataset"]]
        figures.append({"name": f"{pretty} LoRA after {point['train_pairs']} train pairs (seen once): seconds",
                        "value": point["seconds"], "unit": "s", "target": "linear in pairs",
                        "anchor": f"dev QWK {point['dev_qwk']:.4f}, dev RMSE (grade) {point['dev_rmse_grade']:.4f} "
                                  f"on {point['dev_pairs']} dev pairs"})
    return figures


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    minutes = args.minutes if args.minutes is not None else (3.0 if args.quick else 8.0)
    test_pairs = args.test_pairs or (60 if args.quick else 400)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if any(READERS[d]() is None for d in datasets):
        skip(NAME, args.quick, "../shared/data (homedepot/crowdflower train.csv) is absent")
    from annotator.models import pull

    model_dir = str(pull("smollm2"))
    started = time.monotonic()
    command = command_line(NAME, args.quick) + (f" --minutes {minutes:g}" if args.minutes is not None else "") + \
        (f" --test-pairs {test_pairs}" if args.test_pairs else "")
    data = ("../shared/data homedepot/train.csv, crowdflower/train.csv; split by query "
            f"(test 20% of queries, {test_pairs} test pairs scored per dataset)")
    reports: dict[str, dict[str, Any]] = {}
    points: list[dict[str, Any]] = []

    def save(partial: bool) -> None:
        # written after every stage, so a run cut short still leaves what it measured
        path = write_result(NAME, args.quick, data, figures_of(reports, points), datasets=reports, scaling=points,
                            total_seconds=round(time.monotonic() - started, 1), partial=partial)
        result = json.loads(path.read_text())
        result["command"] = command
        path.write_text(json.dumps(result, indent=2, default=float))

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        for dataset in datasets:
            reports[dataset] = run_dataset(dataset, model_dir, minutes, test_pairs, work, args.quick)
            points.extend(scaling_points(dataset, reports[dataset]))
            save(partial=True)
    save(partial=False)


if __name__ == "__main__":
    main()
