"""Shared pytest fixtures. Area owners may add fixtures here; keep each one small."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM on this CPU: in-process engine core, 1 GiB KV cache (see DEVELOPERS rules).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + tokenizer folder (annotator.tiny.build_tiny_llama), built once per session."""
    from annotator.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)
