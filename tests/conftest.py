"""Shared pytest fixtures. Area owners may add fixtures here; keep each one small."""
from __future__ import annotations

from pathlib import Path

import pytest

from labelstore.runtime import apply_engine_env_defaults

apply_engine_env_defaults()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + tokenizer folder (annotator.tiny.build_tiny_llama), built once per session."""
    from annotator.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)
