"""Transfer to data the labeler never saw: fit on Home Depot + CrowdFlower, label the 200 ESCI rows.

Home Depot's 1-3 means and CrowdFlower's 1-4 medians are mapped onto the ``esci`` scheme by its rating maps
(`labelstore.schemes`, ``prompts/schemes/esci.toml``); 10% of each dataset's queries are held out as dev. Then,
as `mnr finetune` fits them, without the LLM:

- the text baseline (TF-IDF + linear, `annotator.stack.fit_lexical`) fitted on the train pairs, argmax;
- the stack over its lexical inputs, fitted on dev (`annotator.stack.fit_deciding_stack`), labelling as it serves;
- the stack over the lexical inputs and the zero-shot all-MiniLM-L6-v2 query-title cosine.

Each stack writes labels as it serves (cut-points on the expected grade when they beat argmax's dev QWK); its
argmax labels are reported beside them, since micro-F1 rewards the most probable label, not the grade order.

Each labels ../shared/data/esci/esci_sample.csv (200 rows, one per query; Exact 138, Substitute 49, Irrelevant 12,
Complement 1), scored by micro-F1 (accuracy: one label per row), macro-F1 and QWK on the grades, beside the
issue's ESCI anchor (0.655) and, as a floor, always answering the commonest ESCI label (which reads the test
labels: a reference, not a system). Writes bench/results/transfer.json.

    python -m bench.bench_transfer [--quick]

``--quick``: 5,000 train pairs per dataset (numbers are noise).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

from annotator import stack as st  # noqa: E402
from annotator.evaluation import evaluate_labels  # noqa: E402
from annotator.finetune import split_by_query, subsample  # noqa: E402
from annotator.text_baseline import class_probs  # noqa: E402
from app.retriever_cosine import zero_shot_cosine  # noqa: E402
from bench.bench_finetune import labelled_frame  # noqa: E402
from bench.bench_stack_inputs import fit_input_stacks  # noqa: E402
from bench.common import shared_data_dir, skip, write_result  # noqa: E402
from labelstore.schemes import LabelScheme, load_scheme  # noqa: E402

NAME = "transfer"
SEED = 2602
DEV_QUERY_SHARE = 0.1
QUICK_TRAIN = 5000
ESCI_ANCHOR = 0.655
SOURCES = ("homedepot", "crowdflower")  # each is also its rating map's name in prompts/schemes/esci.toml
SYSTEMS = {"tfidf_linear": "TF-IDF + linear", "stack_lexical": "stack, lexical inputs",
           "stack_lexical_cosine": "stack, lexical + zero-shot MiniLM cosine"}


def source_pairs(quick: bool) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(train, dev) pooled over `SOURCES`, labelled by the esci scheme's rating maps; dev holds out each source's
    queries (`annotator.finetune.split_by_query`)."""
    trains, devs = [], []
    for source in SOURCES:
        frame = labelled_frame(source, "esci", source)
        if frame is None:
            return None
        frame["query_id"] = source + ":" + frame["query_id"]
        train, dev = split_by_query(frame, DEV_QUERY_SHARE, SEED)
        trains.append(subsample(train, QUICK_TRAIN if quick else None, SEED))
        devs.append(dev)
    return pd.concat(trains, ignore_index=True), pd.concat(devs, ignore_index=True)


def esci_rows(scheme: LabelScheme) -> pd.DataFrame | None:
    root = shared_data_dir()
    path = None if root is None else root / "esci" / "esci_sample.csv"
    if path is None or not path.is_file():
        return None
    raw = pd.read_csv(path, encoding="utf-8")
    return pd.DataFrame({"query": raw["query"].astype(str), "title": raw["product_title"].fillna("").astype(str),
                         "label": [scheme.normalize(str(v)) for v in raw["esci_label"]]})


def metrics(scheme: LabelScheme, test: pd.DataFrame, probs: np.ndarray, chosen: np.ndarray | None = None) -> dict[str, Any]:
    labels = scheme.label_names
    truth = test["label"].map(labels.index).to_numpy()
    result = evaluate_labels(truth, probs, [scheme.grades[name] for name in labels], label_names=labels, chosen=chosen)
    written = probs.argmax(axis=1) if chosen is None else np.asarray(chosen)
    return {"micro_f1": result["accuracy"], **{k: result[k] for k in ("macro_f1", "qwk", "log_loss", "confusion_matrix")},
            "written": dict(zip(labels, np.bincount(written, minlength=len(labels)).tolist()))}


def run(quick: bool) -> dict[str, Any] | None:
    scheme = load_scheme("esci")
    labels, grades = scheme.label_names, [scheme.grades[name] for name in scheme.label_names]
    pairs, test = source_pairs(quick), esci_rows(scheme)
    if pairs is None or test is None:
        return None
    train, dev = pairs
    started = time.monotonic()
    baseline = st.fit_lexical(train, train["label"].map(labels.index).to_numpy())
    report: dict[str, Any] = {
        "train_pairs": len(train), "dev_pairs": len(dev), "test_rows": len(test),
        "train_label_share": train["label"].value_counts(normalize=True).round(4).to_dict(),
        "test_label_share": test["label"].value_counts(normalize=True).round(4).to_dict(),
        "tfidf_linear": metrics(scheme, test, class_probs(baseline, test[["query", "title"]], len(labels)))}
    majority = test["label"].value_counts().idxmax()
    always = np.tile(np.eye(len(labels))[labels.index(majority)], (len(test), 1))
    report["always_commonest_test_label"] = {"label": majority, **metrics(scheme, test, always)}
    retriever = zero_shot_cosine()
    for system, stack in fit_input_stacks(labels, grades, baseline, dev, retriever)[0].items():
        probs = stack.predict_proba(test, retriever=retriever if stack.uses_cosine else None)
        report[system] = {**metrics(scheme, test, probs, stack.choose_labels(probs)), "cutoffs": stack.cutoffs,
                          "argmax": metrics(scheme, test, probs)}
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def figures_of(report: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    mark = " (quick: numbers are noise)" if quick else ""
    floor = report["always_commonest_test_label"]
    anchor = (f"issue anchor {ESCI_ANCHOR}; always '{floor['label']}' {floor['micro_f1']:.3f} (reads the test labels); "
              f"{report['test_rows']} rows, so one row is 0.005")
    return [{"name": f"ESCI micro-F1, fitted on Home Depot + CrowdFlower, {pretty}{mark}",
             "value": round(report[system]["micro_f1"], 4), "unit": "micro-F1",
             "target": (f">= {ESCI_ANCHOR}" + (" (met)" if report[system]["micro_f1"] >= ESCI_ANCHOR else " (NOT met)"))
             if system != "tfidf_linear" else "reference",
             "anchor": f"{anchor}; macro-F1 {report[system]['macro_f1']:.3f}, QWK {report[system]['qwk']:.3f}"
                       + (f"; its argmax labels {report[system]['argmax']['micro_f1']:.3f}" if "argmax" in report[system] else "")}
            for system, pretty in SYSTEMS.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    report = run(args.quick)
    if report is None:
        skip(NAME, args.quick, "../shared/data (homedepot, crowdflower train.csv, esci/esci_sample.csv) is absent")
    print(", ".join(f"{s} {report[s]['micro_f1']:.3f}" for s in (*SYSTEMS, "always_commonest_test_label")), flush=True)
    data = ("../shared/data homedepot/train.csv + crowdflower/train.csv (train; 10% of queries dev), "
            "esci/esci_sample.csv (test)")
    path = write_result(NAME, args.quick, data, figures_of(report, args.quick), report=report)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
