"""The pieces of a fine-tuning run's pace, float32 against bfloat16: caching pairs through the frozen blocks, and
a training step over the cache.

`mnr finetune`'s cached path (`annotator.finetune`, `annotator.layer_cache`) spends its budget on two things:
each train pair once through the lower 26 blocks of SmolLM2-135M (caching), and steps of LoRA on the top 4
blocks over those cached states. This bench times both on real Home Depot pairs in the labeler's short pair form,
after the home-improvement policy prefix, through the same functions `finetune` calls, once per compute dtype
(`annotator.finetune.compute_in`; bfloat16 is what ``--compute-dtype auto`` picks on a CPU with native bf16).

    python -m bench.bench_train_pace [--quick] [--pairs N] [--threads T]

Each figure is the mean of timed repeats after a warm-up one; the ratio is taken within the run. ``--quick``:
64 pairs, 2 timed steps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import read_homedepot, skip, write_result  # noqa: E402

NAME = "train_pace"
DTYPES = ("float32", "bfloat16")
TOP_K = 4
BATCH = 32
CACHE_BATCH = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 pairs, 2 timed steps.")
    parser.add_argument("--pairs", type=int, default=None, help="Home Depot pairs cached per dtype (default 512).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    return parser.parse_args()


def measure(dtype_name: str, *, model: Any, prefix: Any, suffixes: list[list[int]], steps: int) -> dict[str, float]:
    """Caching pairs/s and seconds a training step (batch of `BATCH`) in ``dtype_name``."""
    import torch

    from annotator import layer_cache as lc
    from annotator.finetune import COMPUTE_DTYPES, compute_in

    dtype = COMPUTE_DTYPES[dtype_name]
    lengths = np.array([len(s) for s in suffixes])
    hidden_size = int(model.get_base_model().config.hidden_size)
    warm = lc.allocate_cache(lengths[:CACHE_BATCH], hidden_size, max_resident_bytes=2**62, spill_dir=None)
    cache = lc.allocate_cache(lengths, hidden_size, max_resident_bytes=2**62, spill_dir=None)
    with compute_in(dtype):  # one group to warm the kernels up, untimed
        lc.fill_cache(model, prefix, suffixes[:CACHE_BATCH], warm, order=np.arange(min(CACHE_BATCH, len(suffixes))),
                      batch_size=CACHE_BATCH)
        lc.fill_cache(model, prefix, suffixes, cache, order=np.arange(len(suffixes)), batch_size=CACHE_BATCH)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    seconds = []
    for step in range(steps + 1):
        batch = rng.choice(len(suffixes), size=min(BATCH, len(suffixes)), replace=False)
        tick = time.perf_counter()
        hidden, batch_lengths = cache.batch(batch)
        with compute_in(dtype):
            logits = lc.top_block_logits(model, prefix, hidden, batch_lengths)
        loss = logits.float().logsumexp(dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up
            seconds.append(time.perf_counter() - tick)
    return {"cache_pairs_per_s": round(len(suffixes) / cache.fill_seconds, 2),
            "step_seconds": round(float(np.mean(seconds)), 3),
            "train_pairs_per_s": round(BATCH / float(np.mean(seconds)), 2)}


def main() -> None:
    args = parse_args()
    import torch

    from annotator.finetune import FinetuneArgs, encode_examples, load_lora_model, load_tokenizer, native_bfloat16
    from annotator import layer_cache as lc
    from annotator.models import pull
    from annotator.pair_form import policy_in_form
    from annotator.prompts import load_prompt_policy

    torch.set_num_threads(args.threads)
    raw = read_homedepot()
    if raw is None:
        skip(NAME, args.quick, "../shared/data homedepot/train.csv is absent")
    n_pairs = args.pairs or (64 if args.quick else 512)
    steps = 2 if args.quick else 6
    frame = raw.sample(n_pairs, random_state=0).reset_index(drop=True)
    frame = frame.assign(pair_id=[f"hd-{i}" for i in range(len(frame))], query_id=frame["query"], label="relevant")
    model_dir = str(pull("smollm2"))
    policy = policy_in_form(load_prompt_policy("home-improvement"), "short")
    examples = encode_examples(load_tokenizer(model_dir), policy, frame)
    model = load_lora_model(model_dir, FinetuneArgs(train_top_k=TOP_K))
    model.train()
    split = int(model.get_base_model().config.num_hidden_layers) - TOP_K
    prefix = lc.prefix_states(model, examples.prefix, split)
    runs = {name: measure(name, model=model, prefix=prefix, suffixes=examples.suffixes, steps=steps) for name in DTYPES}
    ratio = {key: round(runs["bfloat16"][key] / runs["float32"][key], 2)
             for key in ("cache_pairs_per_s", "train_pairs_per_s")}
    tokens = float(np.mean([len(s) for s in examples.suffixes]))
    anchor = (f"{n_pairs} Home Depot pairs, short pair part {tokens:.1f} tokens after a {len(examples.prefix)}-token "
              f"prefix; SmolLM2-135M, LoRA on the top {TOP_K} blocks, batch {BATCH}; native bf16: {native_bfloat16()}")
    figures = []
    for name in DTYPES:
        figures.append({"name": f"caching through the frozen blocks, {name}", "value": runs[name]["cache_pairs_per_s"],
                        "unit": "pairs/s", "target": "", "anchor": anchor})
        figures.append({"name": f"training step over the cache, {name}", "value": runs[name]["train_pairs_per_s"],
                        "unit": "pairs/s", "target": "", "anchor": f"{runs[name]['step_seconds']} s a step of {BATCH}"})
    figures.append({"name": "bfloat16 over float32, caching", "value": ratio["cache_pairs_per_s"], "unit": "x",
                    "target": "", "anchor": "same run"})
    figures.append({"name": "bfloat16 over float32, training", "value": ratio["train_pairs_per_s"], "unit": "x",
                    "target": "", "anchor": "same run"})
    write_result(NAME, args.quick, f"../shared/data homedepot/train.csv: {n_pairs} pairs sampled (seed 0)", figures,
                 runs=runs, ratio_bfloat16_over_float32=ratio, threads=args.threads)


if __name__ == "__main__":
    main()
