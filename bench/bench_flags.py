"""Policy flags: a planted pesticide flag on Home Depot, zero-shot and fine-tuned (issue #21, Flags benchmark).

The `home-improvement` policy's ``pesticide`` flag ("a chemical or bait made to kill, poison or repel insects,
rodents, snails, weeds, moss or fungi ... traps, glue boards, screens, mattress covers, bug lights and sprayers
sold empty are not") is planted on Home Depot products by a rule of our own word lists and exclusions
(`bench.flag_rule`: about 210 of the 45,720 products). `bench/flag_truth_sample.csv` holds a hand check of the
rule on 100 products (product_uid and verdict only; the titles stay in the shared data), and the agreement is
reported.

Pairs: every pair of a flagged product and of a near miss (a title sharing the rule's words that the rule
clears: traps, insect screens, "Killer Cans" spray paint, mattress covers), plus random other pairs, so
positives are oversampled. Split by query: test is 25% of the queries, dev 15% of the rest, train the rest.

Systems, on the test pairs (held-out queries), the flag threshold chosen on dev (best F1):
- zero-shot: SmolLM2-135M base, the policy's prompt; P(flag) = sigmoid(lp_yes - lp_no) of the flag prompt
  (the grade prompt, the model's most probable grade, then ``Flag pesticide:``);
- fine-tuned: `annotator.finetune.finetune` with the flag decisions of the train pairs under a wall-clock
  budget; the adapter alone (P at its calibrated flag temperature), the stack without the LLM (title-words
  and lexical inputs only) and the full stack (`Stack.predict_flags`);
- the grade's QWK (adapter alone) with flags in training and without (a second run, same budget and pairs).

Scores come from fine-tuning's shared-prefix forward (`annotator.finetune.score_examples`), the fastest way
on a CPU; a few test pairs are scored again by the labeler itself (`Labeler.flag_logprobs`, transformers backend)
and the largest log-odds gap is reported.

    python -m bench.bench_flags [--quick] [--minutes M] [--zero-shot-from FLAGS_JSON]
                                [--without-flags-adapter DIR] [--keep DIR]

``--zero-shot-from`` and ``--without-flags-adapter`` reuse what an earlier run of the same mode made (the
pairs are the same: a fixed seed), so a change to flag training can be measured again in one 30-minute run.

``--quick``: 1.5 minutes per fine-tuning run, 300 random pairs beside the planted ones, at most 100 dev and
160 test pairs (a few minutes; its numbers are noisy). Full: 30 minutes per run (the grade's budget), 1,400
random pairs, every dev and test pair.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_curve, precision_recall_fscore_support  # noqa: E402
from sklearn.model_selection import GroupShuffleSplit  # noqa: E402

from annotator import stack as st  # noqa: E402
from annotator.evaluation import evaluate_labels  # noqa: E402
from annotator.finetune import (  # noqa: E402
    FinetuneArgs,
    encode_examples,
    finetune,
    flag_probability,
    load_tokenizer,
    score_examples,
)
from annotator.models import resolve_model  # noqa: E402
from annotator.pair_form import policy_for_adapter  # noqa: E402
from annotator.prompts import FLAG_OPTIONS, PairText, Policy, load_prompt_policy  # noqa: E402
from annotator.scoring import label_token_ids  # noqa: E402
from bench.common import skip, write_result  # noqa: E402
from bench.flag_rule import is_near_miss, is_pesticide  # noqa: E402
from labelstore.paths import shared_data_dir  # noqa: E402

NAME = "flags"
SEED = 2602
POLICY = "home-improvement"
FLAG = "pesticide"
TRUTH_SAMPLE = Path(__file__).resolve().parent / "flag_truth_sample.csv"
QUICK = {"minutes": 1.5, "n_random": 300, "max_dev": 100, "test_pairs": 160, "eval_every": 10, "backend_check": 4}
FULL = {"minutes": 30.0, "n_random": 1400, "max_dev": None, "test_pairs": None, "eval_every": 50, "backend_check": 16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small budget: a few minutes in all.")
    parser.add_argument("--minutes", type=float, default=None, help="Budget per fine-tuning run (default 1.5 quick, 30 full).")
    parser.add_argument("--model", default="smollm2", help="Base model (a pulled name or a HF folder).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--zero-shot-from", type=Path, default=None,
                        help="Take the zero-shot figures from this earlier flags.json of the same mode (same pairs).")
    parser.add_argument("--without-flags-adapter", type=Path, default=None,
                        help="An adapter an earlier run of the same mode trained without flags (the no-flag reference "
                             "is scored, not trained again).")
    parser.add_argument("--keep", type=Path, default=None, help="Keep both adapters under this folder.")
    return parser.parse_args()


# -- data -------------------------------------------------------------------------------------------
def read_products() -> pd.DataFrame | None:
    """Home Depot train.csv pairs: query, title, product_uid, rating, label (graded3), pesticide, near_miss."""
    root = shared_data_dir()
    if root is None or not (root / "homedepot" / "train.csv").is_file():
        return None
    raw = pd.read_csv(root / "homedepot" / "train.csv", encoding="utf-8")
    scheme = load_prompt_policy(POLICY).scheme
    titles = raw.drop_duplicates("product_uid").set_index("product_uid")["product_title"].astype(str)
    rule = titles.map(is_pesticide)
    near = titles.map(is_near_miss)
    frame = pd.DataFrame({"query": raw["search_term"].astype(str), "title": raw["product_title"].astype(str),
                          "description": None, "brand": None, "product_uid": raw["product_uid"],
                          "raw_rating": raw["relevance"].astype(float)})
    frame["label"] = [scheme.map_rating("homedepot", r) for r in frame["raw_rating"]]
    frame["query_id"] = frame["query"].str.strip().str.lower()
    frame["pair_id"] = [f"homedepot-{i}" for i in raw["id"]]
    frame["pesticide"] = frame["product_uid"].map(rule).to_numpy(dtype=bool)
    frame["near_miss"] = frame["product_uid"].map(near).to_numpy(dtype=bool)
    return frame


def planted_set(frame: pd.DataFrame, n_random: int) -> pd.DataFrame:
    """Every pair of a flagged product and of a near miss, plus ``n_random`` other pairs at random."""
    planted = frame[frame["pesticide"] | frame["near_miss"]]
    others = frame.drop(index=planted.index).sample(n=n_random, random_state=SEED)
    return pd.concat([planted, others]).reset_index(drop=True)


def split_by_query(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, dev, test): test 25% of the queries, dev 15% of the rest."""
    def held(part: pd.DataFrame, share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        keep, out = next(GroupShuffleSplit(n_splits=1, test_size=share, random_state=SEED)
                         .split(part, groups=part["query_id"]))
        return part.iloc[keep].reset_index(drop=True), part.iloc[out].reset_index(drop=True)

    rest, test = held(frame, 0.25)
    train, dev = held(rest, 0.15)
    return train, dev, test


def with_decisions(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the planted flag as human decisions (column ``flags``, what `finetune` learns)."""
    return frame.assign(flags=[{FLAG: bool(flagged)} for flagged in frame["pesticide"]])


def truth_sample_agreement(frame: pd.DataFrame) -> dict[str, Any]:
    """The rule against the hand-checked verdicts of `TRUTH_SAMPLE` (product_uid, verdict yes/no)."""
    with open(TRUTH_SAMPLE, encoding="utf-8") as handle:
        verdicts = {int(row["product_uid"]): row["verdict"] == "yes" for row in csv.DictReader(handle)}
    rule = frame.drop_duplicates("product_uid").set_index("product_uid")["pesticide"]
    pairs = [(bool(rule[uid]), verdict) for uid, verdict in verdicts.items() if uid in rule.index]
    agree = [r == v for r, v in pairs]
    return {"n": len(pairs), "agreement": round(float(np.mean(agree)), 4),
            "rule_yes_hand_no": sum(r and not v for r, v in pairs), "rule_no_hand_yes": sum(v and not r for r, v in pairs),
            "hand_yes": sum(v for _, v in pairs), "rule_yes": sum(r for r, _ in pairs)}


# -- scoring ----------------------------------------------------------------------------------------
def load_model(model_dir: str, adapter: Path | None = None) -> Any:
    """The model (and adapter) in float32, as fine-tuning trains it and the labeler serves it on this CPU.

    Not the checkpoint's own dtype: SmolLM2's is bfloat16, and scored in it the test pairs' grade
    log-probabilities moved by up to 0.19 and flipped grades (the "backend gap" of the first full runs).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def score_pairs(model: Any, tokenizer: Any, policy: Policy, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(n, K) grade log-probabilities and (n, 2) flag log-probabilities of the pairs of ``frame``, the flag
    prompt after the model's most probable grade (as a labeler asks it)."""
    label_ids = label_token_ids(tokenizer, policy.answer_options())
    flag_ids = label_token_ids(tokenizer, list(FLAG_OPTIONS))
    examples = encode_examples(tokenizer, policy, frame.drop(columns="flags", errors="ignore"))
    if examples.skipped:
        raise ValueError(f"pairs with no usable title: {', '.join(examples.skipped[:5])}")
    grade = score_examples(model, examples, label_ids, flag_ids, tokenizer.pad_token_id).grade
    chosen = [policy.scheme.label_names[i] for i in grade.argmax(1)]
    asked = frame.assign(label=chosen, flags=[{FLAG: True}] * len(frame))
    flag = score_examples(model, encode_examples(tokenizer, policy, asked), label_ids, flag_ids,
                          tokenizer.pad_token_id).flag
    return grade, flag


def backend_gap(model_dir: str, adapter: Path, policy: Policy, frame: pd.DataFrame, flag_logprobs: np.ndarray) -> float:
    """The largest |log-odds| difference between `score_pairs` and the labeler's own flag scoring
    (`Labeler.flag_logprobs`, transformers backend, the adapter without its stack) on ``frame``.
    ``policy`` is the base policy; the labeler puts it in the adapter's pair form itself."""
    from annotator.labeler import Labeler

    pairs = pairs_of(frame)
    with Labeler(model_dir, policy, backend="transformers", adapter=adapter, use_stack=False) as labeler:
        labels = [labeler.label_names[i] for i in labeler.logprobs(pairs).argmax(axis=1)]
        again = labeler.flag_logprobs(pairs, labels)[:, 0]
    return float(np.abs((again[:, 0] - again[:, 1]) - (flag_logprobs[:, 0] - flag_logprobs[:, 1])).max())


def pairs_of(frame: pd.DataFrame) -> list[PairText]:
    return [PairText(r.query, r.title, pair_id=r.pair_id) for r in frame.itertuples()]


# -- metrics ----------------------------------------------------------------------------------------
def best_threshold(truth: np.ndarray, prob: np.ndarray) -> float:
    """The threshold on P(flag) with the best F1 on dev (0.5 when dev has no positive)."""
    if not truth.any():
        return 0.5
    precision, recall, thresholds = precision_recall_curve(truth, prob)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def at_threshold(truth: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(truth, prob >= threshold, average="binary",
                                                               zero_division=0)
    return {"f1": round(float(f1), 4), "precision": round(float(precision), 4), "recall": round(float(recall), 4),
            "threshold": round(threshold, 4)}


def flag_result(dev_truth: np.ndarray, dev_prob: np.ndarray, test_truth: np.ndarray, test_prob: np.ndarray,
                unseen: np.ndarray) -> dict:
    """Test figures at the threshold chosen on dev, on every test pair and on those whose product no train pair
    shows (``unseen``: a title-words model has not seen their titles)."""
    threshold = best_threshold(dev_truth, dev_prob)
    return {**at_threshold(test_truth, test_prob, threshold),
            "unseen_products": {"n": int(unseen.sum()), "positives": int(test_truth[unseen].sum()),
                                **at_threshold(test_truth[unseen], test_prob[unseen], threshold)}}


def grade_truth(frame: pd.DataFrame, policy: Policy) -> np.ndarray:
    names = policy.scheme.label_names
    return np.array([names.index(label) for label in frame["label"]])


def grade_qwk(logprobs: np.ndarray, frame: pd.DataFrame, policy: Policy, temperature: float) -> float:
    from annotator.calibration import apply_temperature

    names = policy.scheme.label_names
    metrics = evaluate_labels(grade_truth(frame, policy), apply_temperature(logprobs, temperature),
                              [policy.scheme.grades[n] for n in names], label_names=names)
    return round(float(metrics["qwk"]), 4)


def qwk_difference(truth: np.ndarray, with_flags: np.ndarray, without_flags: np.ndarray, *,
                   resamples: int = 2000, seed: int = SEED) -> dict[str, float]:
    """QWK(with) - QWK(without) on the same test pairs (predicted grade indices, shape (n,) each), with a 95%
    paired bootstrap interval over pairs. 'no worse' holds unless the whole interval lies below 0."""
    from sklearn.metrics import cohen_kappa_score

    def qwk(pred: np.ndarray, rows: np.ndarray) -> float:
        value = cohen_kappa_score(truth[rows], pred[rows], weights="quadratic", labels=np.unique(truth))
        return 0.0 if np.isnan(value) else float(value)

    everything = np.arange(len(truth))
    rng = np.random.default_rng(seed)
    draws = [qwk(with_flags, rows) - qwk(without_flags, rows)
             for rows in (rng.integers(0, len(truth), len(truth)) for _ in range(resamples))]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"difference": round(qwk(with_flags, everything) - qwk(without_flags, everything), 4),
            "low": round(float(low), 4), "high": round(float(high), 4), "no_worse": bool(high >= 0.0)}


# -- systems ----------------------------------------------------------------------------------------
def zero_shot(model_dir: str, tokenizer: Any, policy: Policy, dev: pd.DataFrame, test: pd.DataFrame,
              unseen: np.ndarray) -> dict[str, Any]:
    model = load_model(model_dir)
    tick = time.monotonic()
    _, dev_flag = score_pairs(model, tokenizer, policy, dev)
    _, test_flag = score_pairs(model, tokenizer, policy, test)
    result = flag_result(dev["pesticide"].to_numpy(), flag_probability(dev_flag), test["pesticide"].to_numpy(),
                         flag_probability(test_flag), unseen)
    return {**result, "score_seconds": round(time.monotonic() - tick, 1)}


def grade_report(meta: dict[str, Any], test_grade: np.ndarray, test: pd.DataFrame, policy: Policy) -> dict[str, Any]:
    """An adapter's training record (``meta.json``) and its test grades ((n, K) log-probabilities): QWK, the
    predicted grade distribution, and the predictions themselves (``_grade_pred``, for the paired bootstrap)."""
    predicted = test_grade.argmax(axis=1)
    return {"train_seconds": meta["train_seconds"], "steps": meta["steps"], "epochs": meta["epochs"],
            "stop_reason": meta["stop_reason"], "n_train": meta["n_train"], "n_dev": meta["n_dev"],
            "grade_qwk_adapter": grade_qwk(test_grade, test, policy, meta["temperature"]),
            "grade_distribution": np.bincount(predicted, minlength=test_grade.shape[1]).tolist(),
            "_grade_pred": predicted}


def fine_tuned(model_dir: str, tokenizer: Any, policy: Policy, train: pd.DataFrame, dev: pd.DataFrame,
               test: pd.DataFrame, args: FinetuneArgs, out: Path, *, flags: bool, backend_check: int,
               unseen: np.ndarray) -> dict[str, Any]:
    """One fine-tuning run (with or without the flag decisions) and its test figures."""
    tick = time.monotonic()
    result = finetune(with_decisions(train) if flags else train, with_decisions(dev) if flags else dev, policy,
                      model_dir, out, args, base_model_name="smollm2")
    meta = result.meta
    served = policy_for_adapter(policy, meta)
    model = load_model(model_dir, out)
    test_grade, test_flag = score_pairs(model, tokenizer, served, test)
    report = grade_report(meta, test_grade, test, policy)
    if not flags:
        return {**report, "seconds": round(time.monotonic() - tick, 1)}
    _, dev_flag = score_pairs(model, tokenizer, served, dev)
    temperature = meta["flag_temperatures"][FLAG]
    dev_truth, test_truth = dev["pesticide"].to_numpy(), test["pesticide"].to_numpy()
    stack = st.load_stack(out)
    texts = lambda frame: frame[["query", "title"]]  # noqa: E731
    dev_stack = stack.predict_flags(texts(dev), dev_flag[:, None, :])[:, 0]
    test_stack = stack.predict_flags(texts(test), test_flag[:, None, :])[:, 0]
    without_llm = lexical_flag_model(stack, dev, dev_truth)
    report.update({
        "flag_temperature": temperature, "flag_calibration": meta["flag_calibration"][FLAG]["status"],
        "adapter": flag_result(dev_truth, flag_probability(dev_flag, temperature), test_truth,
                               flag_probability(test_flag, temperature), unseen),
        "stack_without_llm": flag_result(dev_truth, without_llm(dev), test_truth, without_llm(test), unseen),
        "stack": flag_result(dev_truth, dev_stack, test_truth, test_stack, unseen),
        "stack_dev_report": meta["stack"].get("flag_dev_report"),
        "backend_max_logodds_gap": backend_gap(model_dir, out, policy, test.head(backend_check), test_flag[:backend_check]),
        "seconds": round(time.monotonic() - tick, 1)})
    return report


def scored_without_flags(model_dir: str, tokenizer: Any, policy: Policy, test: pd.DataFrame,
                         adapter: Path) -> dict[str, Any]:
    """The no-flag reference from an adapter trained earlier (same pairs and budget): its training record and
    its test grades, as `fine_tuned(flags=False)` reports them."""
    from annotator.finetune import read_meta

    tick = time.monotonic()
    meta = read_meta(adapter)
    if any(counts.get("train_yes", 0) + counts.get("train_no", 0) for counts in (meta.get("flag_decisions") or {}).values()):
        raise SystemExit(f"{adapter}: this adapter learnt flags; --without-flags-adapter needs one trained without")
    test_grade, _ = score_pairs(load_model(model_dir, adapter), tokenizer, policy_for_adapter(policy, meta), test)
    return {**grade_report(meta, test_grade, test, policy), "reused_adapter": str(adapter),
            "seconds": round(time.monotonic() - tick, 1)}


def lexical_flag_model(stack: st.Stack, dev: pd.DataFrame, dev_truth: np.ndarray):
    """The flag's stack without the LLM input, fitted on the same dev pairs: P(flag) of a frame."""
    words = stack.flags[0].words
    model = st.FlagModel(FLAG, ("lexical",), words, None)

    def lexical(frame: pd.DataFrame) -> np.ndarray:
        return st.lexical_inputs(stack.lexical, frame, len(stack.labels))

    model.model = st.stack_model().fit(model.design(llm=None, lexical=lexical(dev),
                                                    words=st.flag_word_logodds(words, dev)), dev_truth.astype(int))
    return lambda frame: model.predict(frame, lexical(frame), None)


def figures(result: dict[str, Any], minutes: float, quick: bool) -> list[dict[str, Any]]:
    note = " (quick: noisy)" if quick else ""
    budget = f"{minutes:g} min fine-tuning budget per run"
    rule = result["truth_sample"]
    zero = result["zero_shot"]
    tuned = result["with_flags"]
    anchor = f"zero-shot SmolLM2-135M F1 {zero['f1']} (same test pairs)"
    rows = [{"name": f"Pesticide rule vs hand check ({rule['n']} products)", "value": rule["agreement"],
             "unit": "agreement", "target": ">= 0.95", "anchor": "hand-checked sample, bench/flag_truth_sample.csv"}]
    for label, system in (("zero-shot SmolLM2-135M", zero), ("fine-tuned adapter alone", tuned["adapter"]),
                          ("stack without the LLM (title words + lexical)", tuned["stack_without_llm"]),
                          ("fine-tuned adapter + stack", tuned["stack"])):
        target = ">= 0.9" if label == "fine-tuned adapter + stack" else ""
        rows.append({"name": f"Pesticide flag F1, {label}, held-out queries{note}", "value": system["f1"],
                     "unit": "F1", "target": target, "anchor": f"{anchor}; {budget}"})
        unseen = system["unseen_products"]
        rows.append({"name": f"Pesticide flag F1, {label}, held-out queries of products no train pair shows{note}",
                     "value": unseen["f1"], "unit": "F1", "target": "",
                     "anchor": f"{unseen['n']} test pairs, {unseen['positives']} flagged"})
        for measure in ("precision", "recall"):
            rows.append({"name": f"Pesticide flag {measure}, {label}{note}", "value": system[measure], "unit": measure,
                         "target": "", "anchor": f"at threshold {system['threshold']} chosen on dev (best dev F1)"})
    gap = result["grade_qwk_difference"]
    rows.append({"name": f"Grade QWK (adapter alone), flags in training{note}", "value": tuned["grade_qwk_adapter"],
                 "unit": "QWK", "target": "no worse than without flags",
                 "anchor": f"without flags: {result['without_flags']['grade_qwk_adapter']} (same pairs, {budget}); "
                           f"difference {gap['difference']:+.3f}, 95% paired bootstrap [{gap['low']:+.3f}, "
                           f"{gap['high']:+.3f}]: {'no worse' if gap['no_worse'] else 'worse'}"})
    rows.append({"name": f"Grade QWK (adapter alone), no flags in training{note}",
                 "value": result["without_flags"]["grade_qwk_adapter"], "unit": "QWK", "target": "reference",
                 "anchor": budget})
    return rows


def main() -> None:
    options = parse_args()
    size = QUICK if options.quick else FULL
    minutes = options.minutes if options.minutes is not None else size["minutes"]
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    frame = read_products()
    if frame is None:
        skip(NAME, options.quick, "Home Depot data absent (../shared/data/homedepot/train.csv)")
    planted = planted_set(frame, size["n_random"])
    train, dev, test = split_by_query(planted)
    if size["max_dev"] is not None:
        dev = dev.sample(n=min(size["max_dev"], len(dev)), random_state=SEED).reset_index(drop=True)
    if size["test_pairs"] is not None:
        test = test.sample(n=min(size["test_pairs"], len(test)), random_state=SEED).reset_index(drop=True)
    model_dir = resolve_model(options.model)
    tokenizer = load_tokenizer(model_dir)
    policy = load_prompt_policy(POLICY)
    args = FinetuneArgs(max_minutes=minutes, max_steps=100_000, max_epochs=1000, eval_every=size["eval_every"],
                        patience=1000, batch_size=16, warmup_steps=10, max_dev=None, seed=0)
    result: dict[str, Any] = {"truth_sample": truth_sample_agreement(frame),
                              "pairs": {name: {"n": len(part), "positives": int(part["pesticide"].sum()),
                                               "near_misses": int(part["near_miss"].sum()),
                                               "queries": int(part["query_id"].nunique())}
                                        for name, part in (("train", train), ("dev", dev), ("test", test))},
                              "products_flagged_by_rule": int(frame.drop_duplicates("product_uid")["pesticide"].sum())}
    unseen = ~test["product_uid"].isin(set(train["product_uid"])).to_numpy()
    if options.zero_shot_from is not None:
        earlier = json.loads(options.zero_shot_from.read_text())
        if earlier["pairs"] != result["pairs"] or earlier["quick"] != options.quick:
            raise SystemExit(f"{options.zero_shot_from}: another mode or other pairs; its zero-shot figures do not apply")
        result["zero_shot"] = {**earlier["zero_shot"], "reused_from": str(options.zero_shot_from)}
    else:
        result["zero_shot"] = zero_shot(model_dir, tokenizer, policy, dev, test, unseen)
    with tempfile.TemporaryDirectory() as scratch:
        folder = options.keep or Path(scratch)
        if options.without_flags_adapter is not None:  # first: a wrong adapter fails before 30 minutes of training
            reference = scored_without_flags(model_dir, tokenizer, policy, test, options.without_flags_adapter)
        result["with_flags"] = fine_tuned(model_dir, tokenizer, policy, train, dev, test, args, folder / "flags",
                                          flags=True, backend_check=size["backend_check"], unseen=unseen)
        if options.without_flags_adapter is not None:
            result["without_flags"] = reference
        else:
            result["without_flags"] = fine_tuned(model_dir, tokenizer, policy, train, dev, test, args, folder / "grade",
                                                 flags=False, backend_check=0, unseen=unseen)
    result["grade_qwk_difference"] = qwk_difference(grade_truth(test, policy), result["with_flags"].pop("_grade_pred"),
                                                    result["without_flags"].pop("_grade_pred"))
    data = (f"../shared/data homedepot/train.csv: {len(planted)} pairs ({int(planted['pesticide'].sum())} of flagged "
            f"products, {int(planted['near_miss'].sum())} near misses); split by query: {len(train)} train, "
            f"{len(dev)} dev, {len(test)} test pairs")
    write_result(NAME, options.quick, data, figures(result, minutes, options.quick), budget_minutes_per_run=minutes,
                 command_full=" ".join(["python -m bench.bench_flags", *sys.argv[1:]]),
                 **result)


if __name__ == "__main__":
    main()
