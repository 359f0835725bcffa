"""Shared helpers of the bench scripts: --quick, JSON results, fixed samples of ../shared/data.

Keep it small. Every script writes exactly one `bench/results/<name>.json` (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from annotator.text_baseline import QueryTitleFeatures, tfidf_linear_model, tfidf_linear_probs  # noqa: F401  (re-exported)
from labelstore.paths import shared_data_dir

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAMPLE_SEED = 2602


def parse_args(description: str, argv: list[str] | None = None, *, adapter: bool = False,
               engine: bool = False) -> argparse.Namespace:
    """``--quick``; with ``adapter``, also ``--adapter DIR``: benchmark that fine-tuned labeler (its policy and stack);
    with ``engine``, also the vLLM engine's ``--dtype`` and ``--adapter-mode``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="Small sample: finishes in a few minutes on 2 CPU cores.")
    if adapter:
        parser.add_argument("--adapter", type=Path, default=None,
                            help="A `mnr finetune` adapter folder: benchmark the labeler it serves (under the policy "
                                 "its meta.json records, with its stack) instead of zero-shot SmolLM2 under esci.")
    if engine:
        parser.add_argument("--dtype", default="auto",
                            help="vLLM dtype (default auto: float32 on CPUs without native bf16, else the model's).")
        parser.add_argument("--adapter-mode", choices=("merge", "lora"), default="merge",
                            help="Serve the adapter merged into the weights (default) or through vLLM's LoRA path.")
    return parser.parse_args(argv)


def adapter_labeler_args(adapter: Path | None) -> tuple[str, dict[str, Any], str]:
    """(policy name, Labeler keyword arguments, a result-name suffix) of ``--adapter`` (none: zero-shot, esci)."""
    if adapter is None:
        return "esci", {}, ""
    from annotator.stack import stack_retriever
    from app.retriever_cosine import zero_shot_cosine
    from trainer.model import ZERO_SHOT_MODEL_ID

    meta = json.loads((adapter / "meta.json").read_text(encoding="utf-8"))
    kwargs: dict[str, Any] = {"adapter": str(adapter)}
    retriever = stack_retriever(adapter)
    if retriever is not None:  # bench_finetune's stacks read the zero-shot MiniLM cosine; no store here
        if retriever != ZERO_SHOT_MODEL_ID:
            raise SystemExit(f"{adapter}: its stack reads retriever {retriever}'s cosine; the benchmarks load only "
                             f"{ZERO_SHOT_MODEL_ID} (no store)")
        kwargs["retriever"] = zero_shot_cosine()
    return str(meta["policy"]), kwargs, "_finetuned"


def command_line(name: str, quick: bool) -> str:
    return f"python -m bench.bench_{name}" + (" --quick" if quick else "")


def device() -> str:
    """The CPU in words: timings from machines with different vector units (AVX2 vs AVX-512 and AMX, where
    vLLM serves bf16) are not comparable, so the JSON says which one ran."""
    return f"cpu, {os.cpu_count()} cores ({', '.join([platform.machine(), *_cpu_model_and_units()])})"


def _cpu_model_and_units() -> list[str]:
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    return ([model] if model else []) + units


def write_result(name: str, quick: bool, data: str, figures: list[dict[str, Any]], **extra: Any) -> Path:
    """Write `bench/results/<name>.json` and print it; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "command": command_line(name, quick), "quick": quick, "data": data,
              "device": device(), "simulated": False, "figures": figures, **extra}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))
    return path


def skip(name: str, quick: bool, why: str) -> None:
    """Record a skipped benchmark (data absent) and exit 0."""
    write_result(name, quick, "absent", [], skipped=why)
    sys.exit(0)


def read_homedepot() -> pd.DataFrame | None:
    """Home Depot train.csv as columns query, title, description, brand, rating (1..3 mean); None if absent."""
    root = shared_data_dir()
    if root is None or not (root / "homedepot" / "train.csv").is_file():
        return None
    frame = pd.read_csv(root / "homedepot" / "train.csv", encoding="utf-8")
    return pd.DataFrame({"query": frame["search_term"], "title": frame["product_title"], "description": None,
                         "brand": None, "rating": frame["relevance"].astype(float)})


def read_crowdflower() -> pd.DataFrame | None:
    """CrowdFlower train.csv as columns query, title, description, brand, rating (1..4 median); None if absent."""
    root = shared_data_dir()
    if root is None or not (root / "crowdflower" / "train.csv").is_file():
        return None
    frame = pd.read_csv(root / "crowdflower" / "train.csv", encoding="utf-8")
    return pd.DataFrame({"query": frame["query"], "title": frame["product_title"],
                         "description": frame["product_description"], "brand": None,
                         "rating": frame["median_relevance"].astype(float)})


def split_sample(frame: pd.DataFrame, n: int, seed: int = SAMPLE_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A fixed sample of `n` rows and the rest (for training baselines), both with a fresh index."""
    sample = frame.sample(n=min(n, len(frame)), random_state=seed)
    rest = frame.drop(index=sample.index)
    return sample.reset_index(drop=True), rest.reset_index(drop=True)


def served_pairs(labeler: Any, pairs: list, rest: pd.DataFrame) -> list:
    """``pairs`` as the labeler serves them: an adapter trained with judged examples (`annotator.judged`) sees
    those of the other Home Depot pairs (``rest``), as `mnr label` shows those of the store, so the prompts have
    the length they have in use."""
    if labeler.judged is None:
        return pairs
    from annotator.batch import judged_from_pool

    scheme = labeler.policy.scheme
    if "homedepot" not in scheme.rating_maps:
        raise SystemExit(f"the adapter's scheme {scheme.name} has no Home Depot rating map to label its judged "
                         "examples with")
    pool = rest.assign(pair_id=[f"rest{i}" for i in range(len(rest))],
                       label=[scheme.map_rating("homedepot", rating) for rating in rest["rating"]])
    return judged_from_pool(labeler, pairs, pool)


def pair_texts(frame: pd.DataFrame) -> list:
    from annotator.prompts import PairText

    def text(value: Any) -> str | None:
        return None if value is None or (isinstance(value, float) and value != value) else str(value)

    return [PairText(str(row.query), str(row.title), text(row.description), text(row.brand), f"row{index}")
            for index, row in enumerate(frame.itertuples())]
