"""Text baseline, fine-tuned adapter, and the calibrated stack with and without the LLM, on two splits.

Home Depot under the `home-improvement` policy (scheme graded3; metrics: RMSE of the expected rating,
rating = grade + 1, against the raw mean rating, and QWK) and CrowdFlower under the `graded4` policy
(scheme graded4; QWK). Two splits per dataset:

- ``random``: test is 20% of the pairs drawn at random, so its queries also occur in training (how teams
  use a labeler: label some pairs of every query, the labeler does the rest; the Kaggle protocol). Dev
  (early stopping, temperature, the stack) is 10% of the other pairs, drawn at random too
  (`mnr finetune --dev-split pair`);
- ``query``: test is 20% of the queries, dev 10% of the rest, train the rest: no query in two of them.

Per split: the text baseline (TF-IDF + linear, fitted on train: `annotator.text_baseline`), labelling by
argmax and, the stronger reference for QWK, by cut-points on its expected grade fitted on dev
(`annotator.decision`); the adapter
alone (`annotator.finetune.finetune` under a wall-clock budget, calibrated), the stack without the LLM
(the text baseline's match features and class probabilities, fitted on the dev pairs the adapter run
scored) and the full stack (`annotator.stack`, fitted by the fine-tuning run itself), each stack labelling as
it serves (cut-points when they beat argmax on dev under cross-fitting: `Stack.choose_labels`), all on the same
test pairs; plus training pairs/s and epochs reached. The baseline fitted here is the stack's lexical
part too (passed to `finetune`), so both see the same train pairs. Both stacks also read the retriever's
query-title cosine (``--retriever zero-shot``, the default: all-MiniLM-L6-v2 as shipped, trained on nothing
here; ``--retriever none`` leaves it out).

    python -m bench.bench_finetune [--quick] [--minutes M] [--test-pairs N] [--datasets homedepot,crowdflower]

``--quick`` (about 15-20 minutes on 2 busy cores): 3 minutes per fine-tuning run, 3,000 baseline train pairs,
64 dev and 60 test pairs: it exercises every step, training included, and its numbers are noise. A shorter
budget trains nothing here: loading and caching the 64 dev pairs alone took 40-70 s at load 8-10, a step of 32
pairs 4-8 s, and `finetune` refuses a budget that cannot fit its ``min_steps`` (10) steps.
The full mode: 30 minutes per run, every train pair, 1,000 dev and 1,000 test pairs (the same code).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.model_selection import GroupShuffleSplit, train_test_split  # noqa: E402

from annotator import stack as st  # noqa: E402
from annotator.answer_head import write_head  # noqa: E402
from annotator.calibration import apply_temperature  # noqa: E402
from annotator.decision import choose_labels, decide_by_cutoffs, read_decision  # noqa: E402
from annotator.evaluation import evaluate_labels  # noqa: E402
from annotator.judged import JUDGED_COUNTS, JudgedSettings, judged_examples  # noqa: E402
from annotator.finetune import (  # noqa: E402
    LR_SCHEDULES,
    FinetuneArgs,
    encode_examples,
    finetune,
    load_tokenizer,
    score_label_logprobs,
    split_dev,
    subsample,
)
from annotator.prompts import load_prompt_policy  # noqa: E402
from annotator.scoring import label_token_ids  # noqa: E402
from annotator.text_baseline import class_probs  # noqa: E402
from app.retriever_cosine import zero_shot_cosine  # noqa: E402
from bench.common import read_crowdflower, read_homedepot, skip, write_result  # noqa: E402

NAME = "finetune"
DEFAULT_MODEL = "smollm2"
SEED = 2602
# dataset -> (policy, rating source, headline metric, public anchors)
DATASETS: dict[str, tuple[str, str, str, str]] = {
    "homedepot": ("home-improvement", "homedepot", "rmse_rating",
                  "Kaggle Home Depot winner RMSE 0.431 (3rd place ensemble 0.4327, its best single model 0.438)"),
    "crowdflower": ("graded4", "crowdflower", "qwk",
                    "Kaggle CrowdFlower winner QWK 0.7219 (35-model ensemble); best single model 0.7077"),
}
READERS = {"homedepot": read_homedepot, "crowdflower": read_crowdflower}


SYSTEMS = ("tfidf_linear", "tfidf_linear_cutoffs", "adapter", "adapter_decided", "stack_without_llm", "stack")
FINE_TUNED = ("adapter", "adapter_decided", "stack")  # the systems every base model gets
SPLITS = ("random", "query")
DEV_SPLIT = {"random": "pair", "query": "query"}  # FinetuneArgs.dev_split: dev drawn as test is
QUICK = {"minutes": 3.0, "baseline_train": 3000, "max_dev": 64, "test_pairs": 60, "eval_every": 10}
FULL = {"minutes": 30.0, "baseline_train": None, "max_dev": 1000, "test_pairs": 1000, "eval_every": 100}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small budget: about 15-20 minutes in all.")
    parser.add_argument("--minutes", type=float, default=None, help="Fine-tuning budget per run (default 3 quick, 30 full).")
    parser.add_argument("--test-pairs", type=int, default=None, help="Test pairs per split (default 60 quick, 1000 full).")
    parser.add_argument("--datasets", default="homedepot,crowdflower")
    parser.add_argument("--models", default=DEFAULT_MODEL,
                        help="Base models to fine-tune, each under the same budget on the same pairs (pulled names: "
                             "smollm2, gemma3). The first one's figures are the headline.")
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--vocab-loss-weight", type=float, default=None,
                        help="FinetuneArgs.vocab_loss_weight (default: fine-tuning's own).")
    parser.add_argument("--compute-dtype", default="auto",
                        help="FinetuneArgs.compute_dtype: auto (bfloat16 where the CPU has it natively), float32, "
                             "bfloat16.")
    parser.add_argument("--retriever", default="zero-shot", choices=("zero-shot", "none"),
                        help="The retriever cosine both stacks read: zero-shot MiniLM (default) or none.")
    parser.add_argument("--judged", type=int, default=None,
                        help="FinetuneArgs.judged_examples: judged titles of the same query shown in each prompt "
                             "(annotator.judged; test pairs see those of the train pairs). Default: fine-tuning's own.")
    parser.add_argument("--judged-counts", default=None, choices=JUDGED_COUNTS,
                        help="FinetuneArgs.judged_counts: when the label counts line is shown (default: "
                             "fine-tuning's own; runs before stop 39 showed it always).")
    parser.add_argument("--match-hint", action="store_true",
                        help="FinetuneArgs.match_hint: each prompt shows how many query words the title holds.")
    parser.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                        help="FinetuneArgs.lr_schedule (default: FinetuneArgs' own).")
    parser.add_argument("--target-epochs", type=float, default=None,
                        help="FinetuneArgs.target_epochs: caching stops where the pairs cached could still be trained "
                             "on this many times (default: FinetuneArgs' own).")
    parser.add_argument("--result-name", default=NAME, help="Write bench/results/<this>.json (default finetune).")
    parser.add_argument("--keep-adapters", type=Path, default=None,
                        help="Keep each run's adapter (with its stack) in <this>/<dataset>-<split> for later benchmarks "
                             "(injection, throughput); default: a temporary folder, removed.")
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


def split_frame(frame: pd.DataFrame, split: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, dev, test): test 20% of the pairs (``random``) or of the queries (``query``); dev 10% of what
    remains, drawn the way test was: pairs at random (their queries in train too), or queries. Dev selects
    the adapter and fits its temperature and the stack, so it must stand for test: a query-disjoint dev for a
    random-pair test left the CrowdFlower stack at QWK 0.42 against the text baseline's 0.64."""
    def by_query(part: pd.DataFrame, share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        keep, held = next(GroupShuffleSplit(n_splits=1, test_size=share, random_state=SEED)
                          .split(part, groups=part["query_id"]))
        return part.iloc[keep].reset_index(drop=True), part.iloc[held].reset_index(drop=True)

    if split == "random":
        rest, test = (part.reset_index(drop=True) for part in train_test_split(frame, test_size=0.2, random_state=SEED))
        return (*split_dev(rest, 0.1, SEED, by=DEV_SPLIT[split]), test)
    rest, test = by_query(frame, 0.2)
    train, dev = by_query(rest, 0.1)
    return train, dev, test


def metrics_of(probs: np.ndarray, frame: pd.DataFrame, labels: list[str], grades: list[int],
               scale: tuple[float, float], chosen: np.ndarray | None = None) -> dict[str, Any]:
    truth = np.array([labels.index(label) for label in frame["label"]])
    result = evaluate_labels(truth, probs, grades, frame["raw_rating"].to_numpy(dtype=float), label_names=labels,
                             rating_scale=scale, chosen=chosen)
    return {k: result[k] for k in ("n", "accuracy", "macro_f1", "qwk", "rmse_rating", "log_loss", "ece",
                                   "confusion_matrix")}


def adapter_logprobs(model_dir: str, adapter: Path, policy: Any, frame: pd.DataFrame, *,
                     without_head: bool = False, judged_pool: pd.DataFrame | None = None) -> tuple[np.ndarray, float]:
    """(n, K) label log-probabilities of ``frame`` from the base model + ``adapter`` in its pair form, and seconds;
    ``without_head``: with its answer head (`annotator.answer_head`) zeroed, for the same-run comparison.
    An adapter trained with judged examples (`annotator.judged`) sees those of ``judged_pool`` (the train pairs).

    Scored with the shared-prefix forward of fine-tuning (`score_label_logprobs`), the fastest way on CPU;
    serving through any backend gives the same numbers (tests/test_finetune.py)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from annotator.finetune import read_meta
    from annotator.pair_form import policy_for_adapter

    start = time.monotonic()
    tokenizer = load_tokenizer(model_dir)
    meta = read_meta(adapter)
    prompt_policy = policy_for_adapter(policy, meta)
    judged = JudgedSettings.from_meta(meta)
    if judged is not None:
        if judged_pool is None:
            raise ValueError(f"adapter {adapter} shows judged examples: pass the pairs they are drawn from")
        pool = judged_pool.assign(label=judged_pool["label"].map(policy.scheme.normalize))
        frame = frame.assign(judged=judged_examples(frame, pool, policy.scheme.label_names, k=judged.k,
                                                    counts=judged.counts))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(adapter))
    label_ids = label_token_ids(tokenizer, prompt_policy.answer_options())
    if without_head:
        write_head(model, None, label_ids)
    examples = encode_examples(tokenizer, prompt_policy, frame)
    if examples.skipped:
        raise RuntimeError(f"{len(examples.skipped)} test pairs have no usable text")
    logprobs = score_label_logprobs(model, examples, label_ids, tokenizer.pad_token_id, batch_size=32)
    return logprobs, time.monotonic() - start


def stack_without_llm(baseline: Any, dev: pd.DataFrame, adapter: Path, labels: list[str], grades: list[int],
                      retriever: st.RetrieverCosine | None) -> st.Stack:
    """The stack without the LLM (lexical inputs, and the ``retriever``'s cosine when given), fitted on the dev
    pairs the adapter run scored (those its full stack was fitted on), deciding as the full stack does
    (`annotator.decision.decide_by_cutoffs` on its out-of-fold dev probabilities)."""
    scored = json.loads((adapter / "split.json").read_text())["dev_pair_ids"]
    rows = dev.set_index("pair_id").loc[scored].reset_index()
    inputs = ("lexical", "cosine") if retriever is not None else ("lexical",)
    matrix = st.design(inputs, lexical=st.lexical_inputs(baseline, rows, len(labels)),
                       cosine=retriever(rows) if retriever is not None else None)
    return st.fit_deciding_stack(labels, grades, inputs, baseline, matrix, rows["label"].map(labels.index).to_numpy(),
                                 rows["query_id"], retriever=retriever.name if retriever is not None else None)[0]


def baseline_labels_by_dev_decision(baseline: Any, dev: pd.DataFrame, test_probs: np.ndarray, labels: list[str],
                                    grades: list[int]) -> tuple[np.ndarray, dict[str, Any]]:
    """The text baseline's test labels (from ``test_probs``) decided as a stack decides
    (`annotator.decision.decide_by_cutoffs`), fitted on dev, out of sample for a baseline fitted on train: the
    stronger reference for QWK; (chosen (n_test,), the dev decision report)."""
    dev_probs = class_probs(baseline, dev[["query", "title"]], len(labels))
    _, cutoffs, report = decide_by_cutoffs(dev_probs, dev["label"].map(labels.index).to_numpy(), grades,
                                              dev["query_id"])
    return choose_labels(test_probs, grades, cutoffs), report


def train_and_score(dataset: str, split: str, model_name: str, model_dir: str, sizes: dict[str, Any], work: Path,
                    train: pd.DataFrame, dev: pd.DataFrame, test: pd.DataFrame, baseline: Any, policy: Any,
                    scale: tuple[float, ...], measure: Any, *, with_lexical_stack: bool) -> dict[str, Any]:
    """Fine-tune ``model_name`` on ``train`` under the budget, then score its adapter alone and its full stack on
    ``test`` (and the stack without the LLM, fitted on the dev pairs this run scored, when asked)."""
    labels = policy.scheme.label_names
    grades = [policy.scheme.grades[name] for name in labels]
    headline = DATASETS[dataset][2]
    tag = f"[{dataset}/{split}/{model_name}]"
    report: dict[str, Any] = {}
    out = work / (f"{dataset}-{split}" if model_name == DEFAULT_MODEL else f"{dataset}-{split}-{model_name}")
    loss = {} if sizes.get("vocab_loss_weight") is None else {"vocab_loss_weight": sizes["vocab_loss_weight"]}
    if sizes.get("judged") is not None:
        loss["judged_examples"] = sizes["judged"]
    if sizes.get("match_hint"):
        loss["match_hint"] = True
    if sizes.get("judged_counts"):
        loss["judged_counts"] = sizes["judged_counts"]
    if sizes.get("lr_schedule"):
        loss["lr_schedule"] = sizes["lr_schedule"]
    if sizes.get("target_epochs"):
        loss["target_epochs"] = sizes["target_epochs"]
    args = FinetuneArgs(max_minutes=sizes["minutes"], eval_every=sizes["eval_every"], patience=10_000,
                        max_dev=sizes["max_dev"], select_metric="qwk", seed=SEED, dev_split=DEV_SPLIT[split],
                        compute_dtype=sizes["compute_dtype"], **loss)
    result = finetune(train, dev, policy, model_dir, out, args, base_model_name=model_name, rating_scale=scale,
                      stack_lexical=baseline, stack_cosine=sizes["retriever"],
                      progress=lambda r: print(f"{tag} step {r['step']} epoch {r['epoch']:.2f} loss {r['train_loss']:.3f} "
                                               f"dev qwk {r['qwk']:.3f} {r['elapsed_s']:.0f}s", flush=True))
    meta = result.meta
    logprobs, seconds = adapter_logprobs(model_dir, out, policy, test, judged_pool=train)
    probs = apply_temperature(logprobs, meta["temperature"])
    report["adapter"] = {**measure(probs), "score_seconds": round(seconds, 1)}
    decision = read_decision(meta.get("decision"), len(labels))
    report["adapter_decided"] = {**measure(probs, choose_labels(probs, *decision) if decision else None),
                                 "decision": (meta.get("decision") or {}).get("dev_report")}
    head = meta.get("answer_head") or {}
    if head.get("used"):
        bare, _ = adapter_logprobs(model_dir, out, policy, test, without_head=True, judged_pool=train)
        report["adapter_without_head"] = {**measure(apply_temperature(bare, 1.0)), "answer_head": head}
    if with_lexical_stack:
        lexical_stack = stack_without_llm(baseline, dev, out, labels, grades, sizes["retriever"])
        lexical_probs = lexical_stack.predict_proba(test, retriever=sizes["retriever"])
        report["stack_without_llm"] = {**measure(lexical_probs, lexical_stack.choose_labels(lexical_probs)),
                                       "cutoffs": lexical_stack.cutoffs}
    full = st.load_stack(out)
    full_probs = full.predict_proba(test, logprobs, sizes["retriever"])
    report["stack"] = {**measure(full_probs, full.choose_labels(full_probs)), "version": full.version,
                       "cutoffs": full.cutoffs, "retriever": full.retriever}
    train_s = max(meta["train_step_wall_seconds"], 1e-9)
    report["training"] = {
        "budget_minutes": sizes["minutes"], "seconds": meta["train_seconds"], "steps": meta["steps"],
        "distinct_pairs": meta["n_train_used"], "pairs_seen": meta["pairs_seen"], "epochs": meta["epochs"],
        "pairs_per_s": round(meta["pairs_seen"] / train_s, 2),
        "cache_pairs_per_s": meta["training_path"].get("train_cache_pairs_per_s"),
        "compute_dtype": meta["training_path"].get("compute_dtype", "torch.float32"),
        "stop_reason": meta["stop_reason"], "phase_seconds": meta["phase_seconds"], "temperature": meta["temperature"],
        "judged": meta.get("judged"), "match_hint": bool(meta["training_args"].get("match_hint")),
        "calibration": meta["calibration"],
        "dev_stack_report": meta["stack"]["dev_report"], "history": result.history}
    print(f"{tag} adapter {report['adapter'][headline]:.4f}, stack {report['stack'][headline]:.4f}; "
          f"{meta['pairs_seen']} pairs seen ({meta['epochs']:.2f} epochs of {meta['n_train_used']})", flush=True)
    return report


@dataclass(frozen=True)
class SplitData:
    """One dataset's split as every run scores it: the policy, its labels and grades, the rating scale, and
    train, dev (at most ``max_dev`` pairs) and test (``test_pairs``) frames."""

    policy: Any
    labels: list[str]
    grades: list[int]
    scale: tuple[float, ...]
    train: pd.DataFrame
    dev: pd.DataFrame
    test: pd.DataFrame


def split_data(dataset: str, split: str, sizes: dict[str, Any]) -> SplitData:
    policy_name, rating_source, _, _ = DATASETS[dataset]
    policy = load_prompt_policy(policy_name)
    labels = policy.scheme.label_names
    train, dev, test = split_frame(labelled_frame(dataset, policy_name, rating_source), split)
    return SplitData(policy, labels, [policy.scheme.grades[name] for name in labels],
                     tuple(float(x) for x in policy.scheme.rating_maps[rating_source].scale), train,
                     subsample(dev, sizes["max_dev"], SEED), subsample(test, sizes["test_pairs"], SEED))


def run_split(dataset: str, split: str, model_dirs: dict[str, str], sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    _, _, headline, anchor = DATASETS[dataset]
    data = split_data(dataset, split, sizes)
    policy, labels, grades, scale = data.policy, data.labels, data.grades, data.scale
    train, dev, test = data.train, data.dev, data.test
    tag = f"[{dataset}/{split}]"
    report: dict[str, Any] = {"split": split, "headline_metric": headline, "anchor": anchor,
                              "train_pairs": len(train), "dev_pairs": len(dev), "test_pairs": len(test)}
    measure = lambda probs, chosen=None: metrics_of(probs, test, labels, grades, scale, chosen)  # noqa: E731

    start = time.monotonic()
    baseline_train = subsample(train, sizes["baseline_train"], SEED)
    baseline = st.fit_lexical(baseline_train, baseline_train["label"].map(labels.index).to_numpy())
    baseline_probs = class_probs(baseline, test[["query", "title"]], len(labels))
    report["tfidf_linear"] = {**measure(baseline_probs), "train_pairs": len(baseline_train),
                              "seconds": round(time.monotonic() - start, 1)}
    chosen, decision = baseline_labels_by_dev_decision(baseline, dev, baseline_probs, labels, grades)
    report["tfidf_linear_cutoffs"] = {**measure(baseline_probs, chosen), "dev_decision": decision}
    print(f"{tag} tfidf+linear {headline} {report['tfidf_linear'][headline]:.4f}, with dev cut-points "
          f"{report['tfidf_linear_cutoffs'][headline]:.4f}", flush=True)

    for number, (model_name, model_dir) in enumerate(model_dirs.items()):
        trained = train_and_score(dataset, split, model_name, model_dir, sizes, work, train, dev, test, baseline,
                                  policy, scale, measure, with_lexical_stack=number == 0)
        if number == 0:  # the first model's figures are the headline ones, under the names earlier runs used
            report.update(trained, model=model_name)
        else:
            report.setdefault("by_model", {})[model_name] = trained
    print(f"{tag} " + ", ".join(f"{name} {report[name][headline]:.4f}" for name in SYSTEMS), flush=True)
    return report


PRETTY = {"homedepot": "Home Depot", "crowdflower": "CrowdFlower"}
SYSTEM_NAMES = {"tfidf_linear": "TF-IDF + linear",
                "tfidf_linear_cutoffs": "TF-IDF + linear, labels by the dev decision (cut-points or argmax)",
                "stack_without_llm": "stack without the LLM", "stack": "full stack (adapter + lexical)"}


def figures_of(reports: dict[str, dict[str, dict[str, Any]]], quick: bool) -> list[dict[str, Any]]:
    mark = " (quick: numbers are noise)" if quick else ""
    figures = []
    for dataset, splits in reports.items():
        for split, report in splits.items():
            metrics = ("rmse_rating", "qwk") if report["headline_metric"] == "rmse_rating" else ("qwk",)
            models = [report.get("model", DEFAULT_MODEL), *report.get("by_model", {})]
            for metric in metrics:
                unit = "RMSE (rating)" if metric == "rmse_rating" else "QWK"
                baseline = report["tfidf_linear"][metric]
                anchor = f"TF-IDF + linear {baseline:.4f}, same {report['test_pairs']} test pairs; {report['anchor']}"
                for system in SYSTEMS:
                    if system in ("tfidf_linear_cutoffs", "adapter_decided") and metric == "rmse_rating":
                        continue  # the expected rating does not depend on the label written
                    for number, model in enumerate(models):
                        if number and system not in FINE_TUNED:
                            continue
                        part = report["by_model"][model] if number else report
                        target = ("reference" if system.startswith("tfidf_linear") else
                                  "better than TF-IDF + linear (either decision)" if system == "stack" else
                                  ">= 90% of TF-IDF + linear by its dev decision" if system == "adapter_decided" else "")
                        cosine = " (+ zero-shot MiniLM cosine)" if system.startswith("stack") and \
                            report["stack"].get("retriever") else ""
                        judged = (part["training"].get("judged") or {}) if system in FINE_TUNED else {}
                        counts = ", counts only beyond K" if judged.get("counts") == "beyond_k" else ""
                        shown = f" (judged examples, K = {judged['k']}{counts})" if judged else ""
                        if system in FINE_TUNED and part["training"].get("match_hint"):
                            shown += " (match hint)"
                        figures.append({"name": f"{PRETTY[dataset]} {split} split {unit}, "
                                                f"{system_name(system, model)}{shown}{cosine}{mark}",
                                        "value": round(part[system][metric], 4), "unit": unit, "target": target,
                                        "anchor": anchor})
                for number, model in enumerate(models):
                    bare = (report["by_model"][model] if number else report).get("adapter_without_head")
                    if bare is not None:
                        head = bare["answer_head"]
                        kept = head["dev_by_l2"][format(head["l2"], "g")]
                        figures.append({"name": f"{PRETTY[dataset]} {split} split {unit}, adapter without its answer "
                                                f"head (LoRA {model_title(model)}, uncalibrated){mark}",
                                        "value": round(bare[metric], 4), "unit": unit, "target": "same run, head zeroed",
                                        "anchor": f"{anchor}; dev {head['metric']} without the head "
                                                  f"{head['dev_without_head']:.4f}, with it "
                                                  f"{kept:.4f}"})
            for model in models:
                training = report.get("by_model", {}).get(model, report)["training"]
                which = "" if model == DEFAULT_MODEL else f" ({model_title(model)})"
                figures.append({"name": f"{PRETTY[dataset]} {split} split: training pairs/s (epochs reached){which}{mark}",
                                "value": training["pairs_per_s"], "unit": "pairs/s",
                                "target": ">= 20,000 distinct pairs, > 1 epoch in 30 min",
                                "anchor": f"{training['pairs_seen']:,} pairs seen, {training['epochs']:.2f} epochs of "
                                          f"{training['distinct_pairs']:,} distinct, {training['budget_minutes']:g} min budget, "
                                          f"arithmetic in {training.get('compute_dtype', 'torch.float32').removeprefix('torch.')}"})
    return figures


def system_name(system: str, model: str) -> str:
    """The table name of ``system``; a fine-tuned one names its base model, the default one as earlier runs did."""
    if system == "adapter":
        return f"adapter alone (LoRA {model_title(model)})"
    if system == "adapter_decided":
        return f"adapter alone (LoRA {model_title(model)}), labels by its dev decision (cut-points or argmax)"
    if system == "stack" and model != DEFAULT_MODEL:
        return f"full stack ({model_title(model)} adapter + lexical)"
    return SYSTEM_NAMES[system]


def model_title(model: str) -> str:
    from annotator.models import PULLABLE

    return PULLABLE[model].title if model in PULLABLE else model


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sizes = dict(QUICK if args.quick else FULL)
    if args.minutes is not None:
        sizes["minutes"] = args.minutes
    if args.test_pairs is not None:
        sizes["test_pairs"] = args.test_pairs
    sizes["vocab_loss_weight"] = args.vocab_loss_weight
    sizes["judged"] = args.judged
    sizes["match_hint"] = args.match_hint
    sizes["judged_counts"] = args.judged_counts
    sizes["lr_schedule"] = args.lr_schedule
    sizes["target_epochs"] = args.target_epochs
    sizes["compute_dtype"] = args.compute_dtype
    sizes["retriever"] = zero_shot_cosine() if args.retriever == "zero-shot" else None
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(READERS[d]() is None for d in datasets):
        skip(NAME, args.quick, "../shared/data (homedepot/crowdflower train.csv) is absent")
    from annotator.models import pull

    model_dirs = {name: str(pull(name)) for name in models}
    started = time.monotonic()
    explicit = [] if "--retriever" in sys.argv else ["--retriever", args.retriever]  # its default changed once
    command = " ".join(["python -m bench.bench_finetune", *sys.argv[1:], *explicit])
    data = (f"../shared/data homedepot/train.csv, crowdflower/train.csv; splits {', '.join(splits)}; "
            f"{sizes['test_pairs']} test pairs, at most {sizes['max_dev']} dev pairs per split")
    reports: dict[str, dict[str, dict[str, Any]]] = {}

    def save(partial: bool) -> None:
        # written after every split, so a run cut short still leaves what it measured
        recorded = {**sizes, "retriever": args.retriever}
        path = write_result(args.result_name, args.quick, data, figures_of(reports, args.quick), datasets=reports, sizes=recorded,
                            total_seconds=round(time.monotonic() - started, 1), partial=partial)
        result = json.loads(path.read_text())
        result["command"] = command
        path.write_text(json.dumps(result, indent=2, default=float))

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = args.keep_adapters or Path(tmp)
        for dataset in datasets:
            for split in splits:
                reports.setdefault(dataset, {})[split] = run_split(dataset, split, model_dirs, sizes, work)
                save(partial=True)
    save(partial=False)


if __name__ == "__main__":
    main()
