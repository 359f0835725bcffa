"""A LoRA adapter folded into its base model's weights, cached on disk, for an engine to load as a plain model.

    folder = merged_model(base_folder, adapter_folder)

W' = W + (alpha / r) · B · A is the function the adapter computes, so the merged model gives the same
label log-probabilities as base + adapter (float32 merge; the tests hold the backends to 1e-3). vLLM's CPU
LoRA path is the reason: on the labeler's prompts it ran 3.3x slower than the same weights merged in float32
and 10x slower in bf16 (docs/annotator.md, "How vLLM serves an adapter").

The cache key hashes the adapter's weights and config, the base folder's files (name, size, mtime), the
merge format and the peft and transformers versions, so a retrained adapter or a re-pulled base gets a new
folder. A folder is written under a temporary name and renamed when complete: a killed merge leaves no
half-written model behind (its staging folder is removed by a later merge), and the cache keeps the few most
recently used merges (each is a full model).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from annotator.models import models_dir
from labelstore.ids import file_hash, stable_hash

COMPLETE = "merged.json"
MERGE_FORMAT = 2  # bump when _write_merged changes what it writes
STAGING = ".tmp-"
KEEP = 4
RECENT_S = 600.0
STALE_S = 6 * 3600.0


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
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}{STAGING}"))
    try:
        _write_merged(model, adapter, staging)
        if out.exists() and not (out / COMPLETE).is_file():  # left incomplete by hand or by another tool
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
    """Remove merged models beyond the `keep` most recently used (never one used in the last RECENT_S seconds:
    another process may be about to load it), and staging folders of merges killed over STALE_S ago."""
    now = time.time()
    for folder in root.glob(f"*{STAGING}*"):
        if now - folder.stat().st_mtime > STALE_S:
            shutil.rmtree(folder, ignore_errors=True)
    done = sorted((folder for folder in root.iterdir() if STAGING not in folder.name and (folder / COMPLETE).is_file()),
                  key=lambda folder: (folder / COMPLETE).stat().st_mtime, reverse=True)
    for folder in done[keep:]:
        if now - (folder / COMPLETE).stat().st_mtime > RECENT_S:
            shutil.rmtree(folder, ignore_errors=True)


def _merge_key(model: Path, adapter: Path) -> str:
    """The adapter's weights and config by content, every file of the base by name, size and time, the merge
    format and the library versions that do the merge."""
    from importlib.metadata import version

    adapter_files = sorted(adapter.glob("adapter_model.*")) + [adapter / "adapter_config.json"]
    base_files = sorted(p for p in model.iterdir() if p.is_file())
    return stable_hash(MERGE_FORMAT, version("peft"), version("transformers"),
                       *(file_hash(str(p)) for p in adapter_files),
                       *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in base_files), length=12)


def _write_merged(model: Path, adapter: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    served_dtype = AutoConfig.from_pretrained(model).dtype  # what "auto" picks for the base, kept
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if base.config.tie_word_embeddings and _adapts_lm_head(adapter):
        # an answer head (a LoRA on lm_head) merged into a tied lm_head would move the label tokens' input
        # embeddings too, and the prompt spells the labels: the merged model gets its own lm_head
        base.lm_head.weight = torch.nn.Parameter(base.get_input_embeddings().weight.detach().clone())
        base.config.tie_word_embeddings = False
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.config.dtype = served_dtype
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    (out / COMPLETE).write_text(json.dumps({"base": str(model), "adapter": str(adapter)}), encoding="utf-8")


def _adapts_lm_head(adapter: Path) -> bool:
    from safetensors import safe_open

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.exists():
        return False
    with safe_open(str(weights), framework="pt") as handle:
        return any(".lm_head.lora_" in key for key in handle.keys())
