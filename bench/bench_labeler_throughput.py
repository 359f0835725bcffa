"""Labeler throughput: the vLLM backend vs a naive per-pair transformers `generate()` loop.

Same SmolLM2-135M-Instruct (`mnr models pull smollm2`), same ESCI policy prompts, same Home Depot
pairs. The vLLM backend scores a batch in one `generate` call with the policy prefix cached; the
baseline runs `generate(max_new_tokens=1, output_scores=True)` once per pair on the full prompt.
Figures: pairs/s of each and their ratio (target >= 10x and >= 20 pairs/s).

With ``--adapter DIR`` both sides run the fine-tuned labeler that adapter serves: vLLM with the adapter
(merged into the weights by default; ``--adapter-mode lora`` serves it through `enable_lora`), its policy,
its short pair form and its stack, against the naive loop on the PEFT model with the same prompts (targets
from the labeler issue: >= 10 pairs/s and >= 5x). JSON `labeler_throughput_finetuned.json`, with
``_lora`` and ``_<dtype>`` appended when those options are given. ``--dtype`` sets vLLM's (default: float32
on CPUs without native bf16, else the model's own); the naive loop is always float32.

    python -m bench.bench_labeler_throughput [--quick] [--adapter DIR] [--adapter-mode merge|lora] [--dtype D]
"""
from __future__ import annotations

import time

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()

import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    adapter_labeler_args,
    command_line,
    pair_texts,
    parse_args,
    read_homedepot,
    served_pairs,
    skip,
    split_sample,
    write_result,
)

NAME = "labeler_throughput"


def naive_generate_loop(model_path: str, prompts: list[str], token_ids: list[int],
                        adapter: str | None = None) -> tuple[float, np.ndarray]:
    """Per-pair `generate()` on the full prompt (with the PEFT ``adapter``, when given); returns (pairs/s, label logprobs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model = model.eval()
    rows = []
    started = time.perf_counter()
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
        rows.append(torch.log_softmax(out.scores[0][0].float(), dim=-1)[token_ids].numpy())
    return len(prompts) / (time.perf_counter() - started), np.stack(rows)


def main() -> None:
    args = parse_args(__doc__, adapter=True, engine=True)
    frame = read_homedepot()
    if frame is None:
        skip(NAME, args.quick, "../shared/data/homedepot/train.csv is absent")
    from annotator.labeler import Labeler
    from annotator.models import pull

    policy, adapter_kwargs, suffix = adapter_labeler_args(args.adapter)
    engine_kwargs = {"dtype": args.dtype, **({"adapter_mode": args.adapter_mode} if args.adapter else {})}
    suffix += ("_lora" if args.adapter and args.adapter_mode == "lora" else "") + (
        f"_{args.dtype}" if args.dtype != "auto" else "")
    model_path = str(pull("smollm2"))
    n_vllm, n_naive = (60, 15) if args.quick else (200, 200)
    sample, rest = split_sample(frame, n_vllm)
    labeler = Labeler("smollm2", policy, backend="vllm", max_model_len=2048, max_num_seqs=64, **adapter_kwargs,
                      **engine_kwargs)
    pairs = served_pairs(labeler, pair_texts(sample), rest)
    labeler.score(pairs[:2])  # warm-up: first batch, fills the prefix cache
    started = time.perf_counter()
    vllm_probs = labeler.score(pairs)
    vllm_rate = len(pairs) / (time.perf_counter() - started)
    prompts = labeler.prompts(pairs[:n_naive])
    token_counts = [len(labeler.backend.encode(p, add_special_tokens=True)) for p in prompts]
    vllm_logprobs = labeler.logprobs(pairs[:n_naive])
    vllm_dtype, adapter_mode = labeler.backend.dtype, labeler.backend.adapter_mode
    served_dtype = str(labeler.backend.llm.llm_engine.model_config.dtype).removeprefix("torch.")
    labeler.close()
    naive_rate, naive_logprobs = naive_generate_loop(model_path, prompts, labeler.token_ids, labeler.adapter)
    # compared before any stack: the label-token log-probabilities both sides compute
    normalise = lambda lp: np.exp(lp) / np.exp(lp).sum(axis=1, keepdims=True)  # noqa: E731
    naive_probs, vllm_label_probs = normalise(naive_logprobs), normalise(vllm_logprobs)
    same_top = float((naive_probs.argmax(1) == vllm_label_probs.argmax(1)).mean())
    ratio = vllm_rate / naive_rate
    what = (f"fine-tuned labeler ({labeler.model_tag}, adapter {adapter_mode}), policy {policy}" if args.adapter else
            "SmolLM2-135M, ESCI policy") + f", vLLM {served_dtype}"
    targets = (">= 10", ">= 5") if args.adapter else (">= 20", ">= 10")
    command = command_line(NAME, args.quick) + (f" --adapter {args.adapter}" if args.adapter else "") + (
        " --adapter-mode lora" if args.adapter and args.adapter_mode == "lora" else "") + (
        f" --dtype {args.dtype}" if args.dtype != "auto" else "")
    write_result(NAME + suffix, args.quick, f"../shared/data/homedepot/train.csv, fixed sample of {n_vllm} pairs "
                 f"({n_naive} for the naive loop)", [
                     {"name": f"vLLM backend throughput, {what}", "value": round(vllm_rate, 2),
                      "unit": "pairs/s", "target": targets[0], "anchor": f"naive generate() loop {naive_rate:.2f} pairs/s"},
                     {"name": "vLLM vs naive per-pair generate() speed-up", "value": round(ratio, 2), "unit": "x",
                      "target": targets[1], "anchor": "same model, prompts and pairs, same run"},
                     {"name": "naive transformers generate() loop throughput", "value": round(naive_rate, 2),
                      "unit": "pairs/s"},
                 ], command=command, vllm_probs_include_stack=labeler.stack is not None,
                 vllm_dtype=served_dtype, vllm_dtype_option=vllm_dtype, naive_dtype="float32",
                 mean_prompt_tokens=float(np.mean(token_counts)),
                 judged_examples=labeler.judged.k if labeler.judged else 0, policy_prefix_chars=len(labeler.policy.prefix()),
                 top_label_agreement_vllm_vs_naive=same_top,
                 max_abs_prob_diff_vllm_vs_naive=float(np.abs(naive_probs - vllm_label_probs).max()),
                 vllm_output_label_share=np.bincount(vllm_probs.argmax(1), minlength=len(labeler.label_names)).tolist())

if __name__ == "__main__":
    main()
