"""The in-process `vllm.LLM` backend: batched, prefix-cached, constrained, with LoRA.

One `generate` call per batch with `max_tokens=1`, `allowed_token_ids` = the label first tokens
and (by default) `StructuredOutputsParams(choice=options)`. The engine runs with
`logprobs_mode="processed_logprobs"`, so the returned top-`n_labels` logprobs are taken after
masking: exactly the label tokens. Build it under `if __name__ == "__main__":` in scripts.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from annotator.backends.base import STOP
from annotator.backends.merged import merged_model
from labelstore.runtime import apply_engine_env_defaults

# Prefix caching reuses whole KV blocks only: small blocks cache more of the policy prefix
# (CPU default 128 leaves up to 127 prefix tokens to recompute per pair; 32 is the CPU minimum).
PREFIX_BLOCK_SIZE = 32


ADAPTER_MODES = ("merge", "lora")
LORA_RANK_SLOTS = (8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(adapter: str | Path) -> int:
    """The smallest `max_lora_rank` vLLM accepts that fits the adapter's rank `r`."""
    rank = int(json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 8))
    return next((slot for slot in LORA_RANK_SLOTS if slot >= rank), rank)


def preferred_dtype(adapter: str | Path | None = None) -> str:
    """float32 with a fine-tuned adapter: `mnr finetune` trains and calibrates it in float32, and bf16 scoring
    moved 7% of the top labels of a Home Depot adapter (docs/annotator.md). Without one: float32 on CPUs
    without native bf16 (no avx512_bf16 / amx_bf16: bf16 is emulated and slow), else auto."""
    if adapter is not None:
        return "float32"
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "auto"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "auto"
    return "auto" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


class VllmBackend:
    """Parameters: `model` a local HF folder; `adapter` a PEFT LoRA folder; engine options pass
    through to `vllm.LLM` (e.g. `max_model_len`, `enforce_eager`, `max_num_seqs`). `dtype="auto"`
    picks float32 with an adapter or on CPUs without native bf16 (`preferred_dtype`).

    `adapter_mode`: "merge" (default) serves the adapter folded into the base weights
    (`annotator.backends.merged`), the same function at the base model's speed; "lora" serves it through
    vLLM's LoRA path (`enable_lora`), as `mnr serve` does, 3-10x slower on CPU. `merged_root`: where merged
    models are kept (default `<cache>/models/merged`)."""

    def __init__(self, model: str, adapter: str | None = None, *, structured: bool = True,
                 max_model_len: int = 2048, enforce_eager: bool = True, seed: int = 0, dtype: str = "auto",
                 block_size: int = PREFIX_BLOCK_SIZE, adapter_mode: str = "merge", merged_root: Path | None = None,
                 **engine_options: Any):
        if adapter_mode not in ADAPTER_MODES:
            raise ValueError(f"adapter_mode must be one of {', '.join(ADAPTER_MODES)}, got {adapter_mode!r}")
        apply_engine_env_defaults()
        from vllm import LLM

        self.structured = structured
        self.lora_request = None
        lora_options: dict[str, Any] = {}
        if adapter is not None and adapter_mode == "merge":
            try:
                model = str(merged_model(model, adapter, root=merged_root))
            except OSError as exc:  # e.g. a read-only or full cache: the LoRA path computes the same, slower
                warnings.warn(f"could not merge adapter {adapter} into {model} ({exc}); serving it through vLLM's "
                              "LoRA path instead, 3-10x slower on CPU", stacklevel=2)
                adapter_mode = "lora"
        self.adapter_mode = adapter_mode if adapter is not None else None
        if adapter is not None and adapter_mode == "lora":
            from vllm.lora.request import LoRARequest

            lora_options = {"enable_lora": True, "max_loras": 1, "max_lora_rank": adapter_rank(adapter)}
            self.lora_request = LoRARequest(Path(adapter).name or "adapter", 1, str(adapter))
        self.dtype = preferred_dtype(adapter) if dtype == "auto" else dtype
        self.llm = LLM(model=model, dtype=self.dtype, enable_prefix_caching=True, block_size=block_size,
                       logprobs_mode="processed_logprobs",
                       max_model_len=max_model_len, enforce_eager=enforce_eager, seed=seed,
                       **lora_options, **engine_options)
        self.tokenizer = self.llm.get_tokenizer()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def sampling_params(self, token_ids: list[int], options: list[str]):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(choice=list(options)) if self.structured else None
        return SamplingParams(max_tokens=1, temperature=1.0, logprobs=len(token_ids), allowed_token_ids=list(token_ids),
                              structured_outputs=structured, detokenize=False)

    def label_logprobs(self, prompts: list[str], token_ids: list[int], options: list[str]) -> np.ndarray:
        params = self.sampling_params(token_ids, options)
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        result = np.full((len(prompts), len(token_ids)), -np.inf)
        for row, output in enumerate(outputs):
            step = output.outputs[0].logprobs[0]
            for col, token in enumerate(token_ids):
                if token in step:
                    result[row, col] = step[token].logprob
        return result

    def generate(self, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=[STOP])
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) if engine is not None else None
        if callable(shutdown):
            shutdown()
        del self.llm
