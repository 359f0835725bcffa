"""How much relevance the base model already carries where the labeler reads its answer.

A linear probe (logistic regression, balanced classes) on SmolLM2-135M's hidden state at the answer
position (the last prompt token, ``Label:``), layer by layer, under the `graded4` policy in the short pair
form the adapters use, beside the text baseline (TF-IDF + linear) on the same pairs. CrowdFlower, a fixed
sample split at random (queries overlap, as in `bench_finetune`'s random split). The fine-tuned adapter
trains the top blocks over these states: a probe near chance says the signal must be built there, not read.

    python -m bench.bench_answer_probe [--quick]

Full: 1,600 pairs (1,100 fit, 500 test; about 4 minutes on 2 cores); quick: 400 (300 / 100).
"""
from __future__ import annotations

import time

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import cohen_kappa_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from annotator import stack as st  # noqa: E402
from annotator.finetune import encode_examples, load_tokenizer, pair_forward, prefix_cache  # noqa: E402
from annotator.pair_form import policy_in_form  # noqa: E402
from annotator.prompts import load_prompt_policy  # noqa: E402
from annotator.text_baseline import class_probs  # noqa: E402
from bench.common import parse_args, read_crowdflower, skip, write_result  # noqa: E402

NAME = "answer_probe"
SEED = 2602
LAYERS = (12, 20, 26, 30)  # SmolLM2-135M has 30 blocks; the adapters train the top 4 (over layer 26's states)
SIZES = {False: (1100, 500), True: (300, 100)}
BATCH = 32


def answer_states(model_dir: str, frame, policy) -> tuple[dict[int, np.ndarray], np.ndarray, float]:
    """Per layer in LAYERS, the (n, hidden) states at each pair's answer position; the class targets; seconds."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    examples = encode_examples(tokenizer, policy, frame)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    states: dict[int, list[np.ndarray]] = {layer: [] for layer in LAYERS}
    tick = time.monotonic()
    with torch.no_grad():
        prefix_kv = prefix_cache(model, examples.prefix)
        for start in range(0, len(examples.suffixes), BATCH):
            suffixes = examples.suffixes[start:start + BATCH]
            output = pair_forward(model, prefix_kv, len(examples.prefix), suffixes, int(tokenizer.pad_token_id),
                                  hidden_states=True)
            rows = torch.arange(len(suffixes))
            at = torch.as_tensor(examples.grade_at[start:start + BATCH])
            for layer in LAYERS:
                states[layer].append(output.hidden_states[layer][rows, at].numpy())
    return ({layer: np.concatenate(parts) for layer, parts in states.items()}, examples.targets,
            time.monotonic() - tick)


def qwk(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(cohen_kappa_score(truth, predicted, weights="quadratic"))


def main() -> None:
    args = parse_args(__doc__)
    raw = read_crowdflower()
    if raw is None:
        skip(NAME, args.quick, "../shared/data crowdflower/train.csv is absent")
    n_fit, n_test = SIZES[args.quick]
    policy = policy_in_form(load_prompt_policy("graded4"), "short")
    names = policy.scheme.label_names
    sample = raw.sample(n_fit + n_test, random_state=SEED).reset_index(drop=True)
    frame = sample.assign(pair_id=[f"crowdflower-{i}" for i in range(len(sample))], query_id=sample["query"],
                          label=[policy.scheme.map_rating("crowdflower", r) for r in sample["rating"]])
    from annotator.models import pull

    states, targets, seconds = answer_states(str(pull("smollm2")), frame, policy)
    fit, test = np.arange(n_fit), np.arange(n_fit, n_fit + n_test)
    lexical = st.fit_lexical(frame.iloc[fit], targets[fit])
    baseline = qwk(targets[test], class_probs(lexical, frame.iloc[test][["query", "title"]], len(names)).argmax(1))
    figures = [{"name": "CrowdFlower QWK, TF-IDF + linear (same pairs)", "value": round(baseline, 4), "unit": "QWK",
                "target": "reference"}]
    probes = {}
    for layer in LAYERS:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
        probe.fit(states[layer][fit], targets[fit])
        probes[layer] = qwk(targets[test], probe.predict(states[layer][test]))
        figures.append({"name": f"CrowdFlower QWK, linear probe on SmolLM2 layer {layer} at the answer position",
                        "value": round(probes[layer], 4), "unit": "QWK", "target": "diagnostic",
                        "anchor": f"TF-IDF + linear {baseline:.3f} on the same pairs (ratio {probes[layer] / baseline:.2f})"})
    write_result(NAME, args.quick, f"../shared/data crowdflower/train.csv, {n_fit} fit / {n_test} test pairs "
                 f"(random, seed {SEED}), policy graded4 in the short pair form", figures,
                 forward_seconds=round(seconds, 1), probe_qwk=probes, tfidf_linear_qwk=baseline)


if __name__ == "__main__":
    main()
