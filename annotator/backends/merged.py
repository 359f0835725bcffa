"""A LoRA adapter folded into its base model's weights, cached on disk, for an engine to load as a plain model.

    folder = merged_model(base_folder, adapter_folder)

W' = W + (alpha / r) · B · A is the function the adapter computes, so the merged model gives the same
label log-probabilities as base + adapter (float32 merge; the tests hold the backends to 1e-3). vLLM's CPU
LoRA path is the reason: on the labeler's prompts it ran 3.3x slower than the same weights merged in float32
and 10x slower in bf16 (docs/annotator.md, "Serving throughput").

The cache key hashes the adapter's weights and config and the base folder's weight files (name, size,
mtime), so a retrained adapter or a re-pulled base gets a new folder. A folder is written under a temporary
name and renamed when complete: a killed merge leaves no half-written model behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from annotator.models import models_dir
from labelstore.ids import file_hash, stable_hash

COMPLETE = "merged.json"
KEEP = 4


def merged_model(model: str | Path, adapter: str | Path, *, root: Path | None = None, keep: int = KEEP) -> Path:
    """The folder of `model` (a local HF folder) with the PEFT LoRA `adapter` merged in; built once, then reused.

    root: where merged models are kept (default `<cache>/models/merged`). keep: how many merged models stay
    there; the least recently used beyond it are removed when a new one is written (each is a full model).
    """
    model, adapter = Path(model).resolve(), Path(adapter).resolve()
    out = (root or models_dir() / "merged") / f"{model.name}+{adapter.name}-{_merge_key(model, adapter)}"
    if (out / COMPLETE).is_file():
        os.utime(out / COMPLETE)  # recently used: kept by the pruning below
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_merged(model, adapter, staging)
        if out.exists() and not (out / COMPLETE).is_file():  # left by a merge killed before it was complete
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(staging, out)
        except OSError:  # another process finished the same merge first: keep its folder
            if not (out / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune(out.parent, keep=max(keep, 1))
    return out


def _prune(root: Path, *, keep: int) -> None:
    done = sorted((folder for folder in root.iterdir() if (folder / COMPLETE).is_file()),
                  key=lambda folder: (folder / COMPLETE).stat().st_mtime, reverse=True)
    for folder in done[keep:]:
        shutil.rmtree(folder, ignore_errors=True)


def _merge_key(model: Path, adapter: Path) -> str:
    adapter_files = sorted(adapter.glob("adapter_model.*")) + [adapter / "adapter_config.json"]
    base_files = sorted(p for p in model.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    return stable_hash(*(file_hash(str(p)) for p in adapter_files),
                       *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in base_files), length=12)


def _write_merged(model: Path, adapter: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    served_dtype = AutoConfig.from_pretrained(model).dtype  # what "auto" picks for the base, kept
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.config.dtype = served_dtype
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    (out / COMPLETE).write_text(json.dumps({"base": str(model), "adapter": str(adapter)}), encoding="utf-8")
