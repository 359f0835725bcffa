"""Environment defaults for the model engines (vLLM, Hugging Face), set in one place.

Every entry point that may load a model calls `apply_engine_env_defaults()` before importing the
engine: values already in the environment win.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

# In-process vLLM engine core with a 1 GiB CPU KV cache; models only from the local cache.
ENGINE_ENV_DEFAULTS: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_engine_env_defaults(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set each default in `env` (the process environment when None) unless it is set; return `env`."""
    target = os.environ if env is None else env
    for key, value in ENGINE_ENV_DEFAULTS.items():
        target.setdefault(key, value)
    return target
