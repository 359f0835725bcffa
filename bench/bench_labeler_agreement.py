"""Zero-shot agreement of the SmolLM2 labeler with human labels, beside a TF-IDF + linear baseline.

Fixed samples (seed 2602) of Home Depot and CrowdFlower pairs. Home Depot is labelled under the
`home-improvement` policy (scheme graded3, human mean rating mapped by the scheme's rating map);
CrowdFlower under the `graded4` policy (scheme graded4, median rating 4/3/2/1 -> perfect/good/
fair/irrelevant): graded relevance, not ESCI's item relations. Figures: accuracy and quadratic-weighted kappa (QWK) on grades. The
baseline (TF-IDF of query and title, their elementwise product, logistic regression) trains on
the rest of the same file, never on the sample.

    python -m bench.bench_labeler_agreement [--quick]
"""
from __future__ import annotations

import time

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import accuracy_score, cohen_kappa_score  # noqa: E402

from bench.common import (  # noqa: E402
    pair_texts, parse_args, read_crowdflower, read_homedepot, skip, split_sample, tfidf_linear_probs, write_result,
)

NAME = "labeler_agreement"
DATASETS = {  # dataset -> (policy, rating source)
    "homedepot": ("home-improvement", "homedepot"),
    "crowdflower": ("graded4", "crowdflower"),
}


def scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(truth, predicted)),
            "qwk": float(cohen_kappa_score(truth, predicted, weights="quadratic"))}


def main() -> None:
    args = parse_args(__doc__)
    frames = {"homedepot": read_homedepot(), "crowdflower": read_crowdflower()}
    if any(frame is None for frame in frames.values()):
        skip(NAME, args.quick, "../shared/data/homedepot or crowdflower is absent")
    from annotator.labeler import Labeler

    n = 100 if args.quick else 500
    n_train = 5000 if args.quick else 20000
    base = Labeler("smollm2", "esci", backend="vllm", max_model_len=2048, max_num_seqs=64)
    figures, details = [], {}
    for dataset, (policy_name, source) in DATASETS.items():
        labeler = base.with_policy(policy_name)
        scheme = labeler.policy.scheme
        sample, rest = split_sample(frames[dataset], n)
        rest = rest.sample(n=min(n_train, len(rest)), random_state=0)
        truth = np.array([scheme.grade_of(scheme.map_rating(source, r)) for r in sample["rating"]])
        started = time.perf_counter()
        probs = labeler.score(pair_texts(sample))
        seconds = time.perf_counter() - started
        grades = np.array([label.grade for label in scheme.labels])
        llm = scores(truth, grades[probs.argmax(axis=1)])
        train_grades = np.array([scheme.grade_of(scheme.map_rating(source, r)) for r in rest["rating"]])
        baseline = scores(truth, tfidf_linear_probs(rest, sample, train_grades, scheme.max_grade + 1).argmax(axis=1))
        predicted_share = pd.Series(np.array(scheme.label_names)[probs.argmax(axis=1)]).value_counts(normalize=True)
        details[dataset] = {"policy": policy_name, "scheme": scheme.name, "n": len(sample), "llm": llm,
                            "tfidf_linear": baseline, "llm_pairs_per_s": len(sample) / seconds,
                            "llm_predicted_label_share": predicted_share.round(3).to_dict(),
                            "human_label_share": pd.Series(np.array(scheme.label_names)[
                                [scheme.label_names.index(scheme.label_for_grade(int(g))) for g in truth]
                            ]).value_counts(normalize=True).round(3).to_dict()}
        for metric in ("qwk", "accuracy"):
            figures.append({
                "name": f"{dataset} {metric}, zero-shot SmolLM2-135M ({policy_name} policy)",
                "value": round(llm[metric], 4), "unit": metric.upper() if metric == "qwk" else "accuracy",
                "target": "baseline beside it; LoRA (issue #4) is expected to beat zero-shot",
                "anchor": f"TF-IDF + linear (same run): {baseline[metric]:.4f}",
            })
    base.close()
    write_result(NAME, args.quick, f"../shared/data homedepot + crowdflower, fixed sample of {n} each (seed 2602); "
                 f"baseline trained on {n_train} other rows", figures, details=details)


if __name__ == "__main__":
    main()
