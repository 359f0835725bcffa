"""What each input of the calibrated stack adds, without the LLM: Home Depot and CrowdFlower, both splits.

The same splits, dev and test pairs as `bench.bench_finetune` (its `split_frame`, 1,000 dev and 1,000 test
pairs), and per split:

- the text baseline (TF-IDF + linear fitted on train; labels by argmax and by dev cut-points);
- the stack over the lexical inputs alone, fitted on the dev pairs (`annotator.stack`);
- the stack over the lexical inputs and the retriever's query-title cosine (all-MiniLM-L6-v2 zero-shot,
  `trainer.model.TwoTowerModel.pair_cosines`).

Both stacks label as they serve (`Stack.choose_labels`). No fine-tuning, so it runs in minutes: the LLM's
own contribution is measured by `bench_finetune`, which reads this cosine in both of its stacks.

It also measures the judged examples (`annotator.judged`) alone, with no model: the label shares among the
``JudgedSettings.k`` train pairs of the query nearest to the test pair (what an adapter's prompt shows), smoothed,
labelling by their dev decision (`annotator.decision.decide_by_cutoffs`; a query without any judged pair gets the
train prior).
And the match hint (`annotator.word_match`) alone: the share of query words the title holds, in a one-feature
logistic regression fitted on train, labelling by its dev decision.

    python -m bench.bench_stack_inputs [--quick] [--datasets homedepot,crowdflower] [--splits random,query]

``--quick``: 3,000 train pairs for the baseline, 200 dev and 200 test pairs (numbers are noise).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

from annotator import stack as st  # noqa: E402
from annotator.decision import choose_labels, decide_by_cutoffs  # noqa: E402
from annotator.finetune import subsample  # noqa: E402
from annotator.judged import JudgedSettings, judged_examples  # noqa: E402
from annotator.prompts import load_prompt_policy  # noqa: E402
from annotator.text_baseline import class_probs  # noqa: E402
from annotator.word_match import query_words_found  # noqa: E402
from bench.bench_finetune import (  # noqa: E402
    DATASETS,
    PRETTY,
    READERS,
    SEED,
    SPLITS,
    baseline_labels_by_dev_decision,
    labelled_frame,
    metrics_of,
    split_frame,
)
from app.retriever_cosine import zero_shot_cosine  # noqa: E402
from bench.common import skip, write_result  # noqa: E402

NAME = "stack_inputs"
SIZES = {False: {"baseline_train": None, "dev": 1000, "test": 1000}, True: {"baseline_train": 3000, "dev": 200, "test": 200}}
SYSTEMS = {"tfidf_linear": "TF-IDF + linear", "tfidf_linear_cutoffs": "TF-IDF + linear, dev decision",
           "stack_lexical": "stack, lexical inputs", "stack_lexical_cosine": "stack, lexical + zero-shot MiniLM cosine",
           "judged_vote": "judged examples alone (labels of the query's nearest judged pairs, no model)",
           "match_share": "match hint alone (share of query words in the title, one-feature logistic regression)"}


def run_split(dataset: str, split: str, sizes: dict[str, Any], retriever: st.RetrieverCosine) -> dict[str, Any]:
    policy_name, rating_source, headline, anchor = DATASETS[dataset]
    scheme = load_prompt_policy(policy_name).scheme
    labels = scheme.label_names
    grades = [scheme.grades[name] for name in labels]
    scale = tuple(float(x) for x in scheme.rating_maps[rating_source].scale)
    train, dev, test = split_frame(labelled_frame(dataset, policy_name, rating_source), split)
    dev, test = subsample(dev, sizes["dev"], SEED), subsample(test, sizes["test"], SEED)
    train = subsample(train, sizes["baseline_train"], SEED)
    measure = lambda probs, chosen=None: metrics_of(probs, test, labels, grades, scale, chosen)  # noqa: E731
    started = time.monotonic()
    baseline = st.fit_lexical(train, train["label"].map(labels.index).to_numpy())
    baseline_probs = class_probs(baseline, test[["query", "title"]], len(labels))
    report: dict[str, Any] = {"split": split, "headline_metric": headline, "anchor": anchor, "train_pairs": len(train),
                              "dev_pairs": len(dev), "test_pairs": len(test), "tfidf_linear": measure(baseline_probs)}
    chosen, _ = baseline_labels_by_dev_decision(baseline, dev, baseline_probs, labels, grades)
    report["tfidf_linear_cutoffs"] = measure(baseline_probs, chosen)
    stacks, cosine_seconds = fit_input_stacks(labels, grades, baseline, dev, retriever)
    report["cosine_seconds_per_1000_pairs"] = round(cosine_seconds / max(1, len(dev)) * 1000, 2)
    for system, stack in stacks.items():
        probs = stack.predict_proba(test, retriever=retriever if stack.uses_cosine else None)
        report[system] = {**measure(probs, stack.choose_labels(probs)), "cutoffs": stack.cutoffs}
    report["judged_vote"] = judged_vote(train, dev, test, labels, grades, measure)
    report["match_share"] = match_share(train, dev, test, labels, grades, measure)
    report["seconds"] = round(time.monotonic() - started, 1)
    print(f"[{dataset}/{split}] " + ", ".join(f"{system} {report[system][headline]:.4f}" for system in SYSTEMS),
          flush=True)
    return report


def judged_vote(train: pd.DataFrame, dev: pd.DataFrame, test: pd.DataFrame, labels: list[str], grades: list[int],
                measure: Any) -> dict[str, Any]:
    """The test metrics of `vote_probs` over the train pairs, labelling by the dev decision."""
    k = JudgedSettings().k
    prior = train["label"].map(labels.index).value_counts(normalize=True).reindex(range(len(labels)), fill_value=0)
    dev_probs = vote_probs(dev, train, labels, k, prior.to_numpy())
    test_probs = vote_probs(test, train, labels, k, prior.to_numpy())
    _, cutoffs, decision = decide_by_cutoffs(dev_probs, dev["label"].map(labels.index).to_numpy(), grades,
                                                dev["query_id"])
    return {**measure(test_probs, choose_labels(test_probs, grades, cutoffs)), "k": k, "dev_decision": decision}


def match_share(train: pd.DataFrame, dev: pd.DataFrame, test: pd.DataFrame, labels: list[str], grades: list[int],
                measure: Any) -> dict[str, Any]:
    """The test metrics of a logistic regression on what the match hint shows (`annotator.word_match`): the
    share of query words the title holds, fitted on the train pairs, labelling by the dev decision."""
    def shares(frame: pd.DataFrame) -> np.ndarray:
        found = [query_words_found(q, t) for q, t in zip(frame["query"], frame["title"])]
        return np.array([[hit / max(1, total)] for hit, total in found])

    model = LogisticRegression(max_iter=1000).fit(shares(train), train["label"].map(labels.index))
    dev_probs, test_probs = (class_probs(model, shares(frame), len(labels)) for frame in (dev, test))
    _, cutoffs, decision = decide_by_cutoffs(dev_probs, dev["label"].map(labels.index).to_numpy(), grades,
                                                dev["query_id"])
    return {**measure(test_probs, choose_labels(test_probs, grades, cutoffs)), "dev_decision": decision}


def vote_probs(pairs: pd.DataFrame, pool: pd.DataFrame, labels: list[str], k: int, prior: np.ndarray) -> np.ndarray:
    """(n, K): per pair, the label shares among its ``k`` nearest judged pairs of ``pool`` plus one pseudo-count
    spread as ``prior``; ``prior`` alone where its query has none."""
    probs = np.tile(prior, (len(pairs), 1))
    for row, judged in enumerate(judged_examples(pairs, pool, labels, k=k)):
        if judged is not None:
            votes = np.array([judged.nearest.count(name) for name in labels], dtype=float)
            probs[row] = (votes + prior) / (votes.sum() + 1.0)
    return probs


def fit_input_stacks(labels: list[str], grades: list[int], baseline: Any, dev: Any,
                     retriever: st.RetrieverCosine) -> tuple[dict[str, st.Stack], float]:
    """({stack_lexical, stack_lexical_cosine}: the stack over those inputs fitted on ``dev`` (columns query, title,
    label, query_id) and labelling by its dev decision, the seconds the dev cosines took)."""
    targets = dev["label"].map(labels.index).to_numpy()
    lexical_dev = st.lexical_inputs(baseline, dev, len(labels))
    tick = time.monotonic()
    cosine_dev = retriever(dev)
    cosine_seconds = time.monotonic() - tick
    stacks = {}
    for system, inputs in (("stack_lexical", ("lexical",)), ("stack_lexical_cosine", ("lexical", "cosine"))):
        name = retriever.name if "cosine" in inputs else None
        matrix = st.design(inputs, lexical=lexical_dev, cosine=cosine_dev if name else None)
        stacks[system] = st.fit_deciding_stack(labels, grades, inputs, baseline, matrix, targets, dev["query_id"],
                                               retriever=name)[0]
    return stacks, cosine_seconds


def figures_of(reports: dict[str, dict[str, dict[str, Any]]], quick: bool) -> list[dict[str, Any]]:
    mark = " (quick: numbers are noise)" if quick else ""
    figures = []
    for dataset, splits in reports.items():
        for split, report in splits.items():
            for metric in ("rmse_rating", "qwk") if report["headline_metric"] == "rmse_rating" else ("qwk",):
                unit = "RMSE (rating)" if metric == "rmse_rating" else "QWK"
                for system, pretty in SYSTEMS.items():
                    if system == "tfidf_linear_cutoffs" and metric == "rmse_rating":
                        continue  # the expected rating does not depend on the label written
                    figures.append({"name": f"{PRETTY[dataset]} {split} split {unit}, {pretty}{mark}",
                                    "value": round(report[system][metric], 4), "unit": unit,
                                    "target": "reference" if system.startswith("tfidf") else "",
                                    "anchor": f"same {report['test_pairs']} test pairs as bench_finetune; "
                                              f"{report['anchor']}"})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--datasets", default="homedepot,crowdflower")
    parser.add_argument("--splits", default=",".join(SPLITS))
    args = parser.parse_args()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if any(READERS[d]() is None for d in datasets):
        skip(NAME, args.quick, "../shared/data (homedepot/crowdflower train.csv) is absent")
    retriever = zero_shot_cosine()
    reports = {dataset: {split: run_split(dataset, split, SIZES[args.quick], retriever) for split in splits}
               for dataset in datasets}
    data = (f"../shared/data homedepot/train.csv, crowdflower/train.csv; splits {', '.join(splits)}; "
            f"{SIZES[args.quick]['test']} test pairs, {SIZES[args.quick]['dev']} dev pairs per split")
    path = write_result(NAME, args.quick, data, figures_of(reports, args.quick), datasets=reports)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
