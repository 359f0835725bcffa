"""An adapter merged into its base model's weights (annotator.backends.merged): the same function as base + LoRA,
built once and reused, rebuilt when the adapter changes, and the cache kept to a few models."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from annotator.backends.merged import COMPLETE, merged_model
from annotator.tiny import build_tiny_adapter


@pytest.fixture()
def adapter(tiny_llama: Path, tmp_path: Path) -> Path:
    return build_tiny_adapter(tiny_llama, tmp_path / "tiny-lora", seed=3)


def _logits(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[0]


def test_the_merged_model_computes_what_base_plus_adapter_computes(tiny_llama: Path, adapter: Path,
                                                                   tmp_path: Path) -> None:
    merged = merged_model(tiny_llama, adapter, root=tmp_path / "merged")
    assert (merged / COMPLETE).is_file() and merged.name.startswith(f"{tiny_llama.name}+tiny-lora-")
    with_lora, folded, base = _logits(tiny_llama, adapter), _logits(merged), _logits(tiny_llama)
    torch.testing.assert_close(folded, with_lora, atol=1e-4, rtol=1e-4)
    assert (folded - base).abs().max() > 0.1, "the adapter is in the weights, not dropped"
    assert not list((tmp_path / "merged").glob("*.tmp-*")), "no staging folder is left behind"


def test_a_merge_is_reused_and_a_changed_adapter_gets_a_new_one(tiny_llama: Path, adapter: Path,
                                                               tmp_path: Path) -> None:
    root = tmp_path / "merged"
    first = merged_model(tiny_llama, adapter, root=root)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert merged_model(tiny_llama, adapter, root=root) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp, "reused, not written again"
    build_tiny_adapter(tiny_llama, adapter, seed=4)  # retrained in place: same folder, other weights
    second = merged_model(tiny_llama, adapter, root=root)
    assert second != first and (second / COMPLETE).is_file()
    torch.testing.assert_close(_logits(second), _logits(tiny_llama, adapter), atol=1e-4, rtol=1e-4)


def test_a_half_written_merge_is_not_used_and_the_cache_keeps_the_most_recent(tiny_llama: Path, adapter: Path,
                                                                             tmp_path: Path) -> None:
    root = tmp_path / "merged"
    first = merged_model(tiny_llama, adapter, root=root)
    (first / COMPLETE).unlink()  # as if killed before it was complete
    again = merged_model(tiny_llama, adapter, root=root)
    assert again == first and (again / COMPLETE).is_file()
    made = [again]
    hour_ago = time.time() - 3600
    for seed in (5, 6):
        for age, folder in enumerate(reversed(made)):  # used an hour or more ago, the first made the longest
            os.utime(folder / COMPLETE, (hour_ago - 60 * age, hour_ago - 60 * age))
        made.append(merged_model(tiny_llama, build_tiny_adapter(tiny_llama, tmp_path / f"lora-{seed}", seed=seed),
                                 root=root, keep=2))
    kept = sorted(folder.name for folder in root.iterdir())
    assert kept == sorted(folder.name for folder in made[1:]), "the least recently used merge was removed"
    stale = root / f"{made[-1].name}.tmp-killed"  # a merge killed long ago left its staging folder
    stale.mkdir()
    os.utime(stale, (hour_ago - 7 * 3600, hour_ago - 7 * 3600))
    merged_model(tiny_llama, build_tiny_adapter(tiny_llama, tmp_path / "lora-7", seed=7), root=root, keep=2)
    assert not stale.exists()
