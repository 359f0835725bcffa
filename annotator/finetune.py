"""LoRA fine-tuning of the labeler on human judgments under a written policy.

The labeler reads ``policy.render(pair)`` = the shared policy prefix + a short pair part ending at
``Label:``, and its answer is the first token of one of ``policy.answer_options()``. Fine-tuning
is supervised on that one token (`label_token_loss`): the cross-entropy of the next-token
distribution at the end of the prompt against the reference label's token, over the full vocabulary
and over the label tokens alone, weighted per class (ratings are skewed). No other token carries loss.

The policy prefix is the same for every pair, so each step runs it once (with the adapter, so
gradients flow through it) and shares its key/value cache across the batch; only the pair parts
are run per example. This is what makes training affordable on a CPU.

The train/dev split is by query (no query in both). Every ``eval_every`` steps the dev set is
scored; the best adapter by ``select_metric`` is kept, training stops after ``patience`` evaluations
without improvement, at ``max_steps``, or when the ``max_minutes`` wall-clock budget is spent.
A temperature is then fitted on dev (`annotator.calibration`). The output folder holds the PEFT
adapter (``adapter_config.json``, ``adapter_model.safetensors``), ``meta.json`` and ``split.json``.
``checkpoint/`` inside it makes an interrupted run resumable.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import GroupShuffleSplit
from sklearn.utils.class_weight import compute_class_weight

from annotator.calibration import apply_temperature, fit_temperature
from annotator.evaluation import evaluate_labels
from annotator.prompts import EmptyProductTextError, PairText, Policy
from annotator.scoring import label_token_ids
from labelstore import ids
from labelstore.errors import MnrError

META_FILE = "meta.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_DIR = "checkpoint"
LOWER_IS_BETTER = {"log_loss", "rmse_grade", "rmse_rating", "ece"}
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneError(MnrError):
    """Fine-tuning cannot start or continue with these inputs."""


@dataclass
class FinetuneArgs:
    """Training arguments; all of them go into ``meta.json``."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LLAMA_LORA_MODULES
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_size: int = 16
    max_steps: int = 2000
    max_epochs: float = 3.0
    eval_every: int = 25
    patience: int = 4
    max_minutes: float | None = None
    class_weighting: str = "balanced"  # balanced | sqrt | none
    select_metric: str = "qwk"
    dev_fraction: float = 0.2
    max_train: int | None = None
    max_dev: int | None = 1000
    eval_batch_size: int = 32
    seed: int = 0


@dataclass
class EncodedExamples:
    """Token ids of a set of pairs: ``prefix`` (shared), ``suffixes[i]`` (pair i), ``targets`` (n,) class index."""

    prefix: list[int]
    suffixes: list[list[int]]
    targets: np.ndarray
    pair_ids: list[str]
    skipped: list[str] = field(default_factory=list)


@dataclass
class FinetuneResult:
    out_dir: Path
    meta: dict[str, Any]
    history: list[dict[str, Any]]


# -- data -------------------------------------------------------------------------------------------
def split_by_query(frame: pd.DataFrame, dev_fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split pairs into (train, dev) so that no ``query_id`` is in both."""
    if frame["query_id"].nunique() < 2:
        raise FinetuneError("need pairs from at least two distinct queries to split train/dev by query")
    splitter = GroupShuffleSplit(n_splits=1, test_size=dev_fraction, random_state=seed)
    train_idx, dev_idx = next(splitter.split(frame, groups=frame["query_id"]))
    return frame.iloc[train_idx].reset_index(drop=True), frame.iloc[dev_idx].reset_index(drop=True)


def subsample(frame: pd.DataFrame, limit: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``limit`` rows, drawn at random (all rows when ``limit`` is None)."""
    if limit is None or len(frame) <= limit:
        return frame
    return frame.sample(n=limit, random_state=seed).reset_index(drop=True)


def data_hash(frame: pd.DataFrame) -> str:
    """A hash of the (pair_id, label) set: the same labels give the same hash, in any order."""
    rows = sorted(f"{p}={lbl}" for p, lbl in zip(frame["pair_id"], frame["label"]))
    return ids.stable_hash(*rows, length=16)


def encode_examples(tokenizer: Any, policy: Policy, frame: pd.DataFrame) -> EncodedExamples:
    """Tokenise the prompts of ``frame`` (columns pair_id, query, title, description, brand, label).

    The prompt is tokenised whole, as an engine would, then cut into the policy prefix (shared) and
    the pair part. Pairs with no usable text are skipped and listed in ``skipped``.
    """
    label_index = {name: i for i, name in enumerate(policy.scheme.label_names)}
    prefix = tokenizer(policy.prefix())["input_ids"]
    full_prompts: list[list[int]] = []
    targets: list[int] = []
    pair_ids: list[str] = []
    skipped: list[str] = []
    for row in frame.itertuples(index=False):
        pair = PairText(query=row.query, title=row.title, description=_text_or_none(row.description),
                        brand=_text_or_none(row.brand), pair_id=row.pair_id)
        try:
            prompt = policy.render(pair)
        except EmptyProductTextError:
            skipped.append(row.pair_id)
            continue
        full_prompts.append(tokenizer(prompt)["input_ids"])
        targets.append(label_index[policy.scheme.normalize(row.label)])
        pair_ids.append(row.pair_id)
    shared = len(prefix)
    for tokens in full_prompts:
        shared = min(shared, _common_prefix_length(prefix, tokens))
    # every pair part must keep at least one token so the answer position is its own
    shared = min([shared] + [len(tokens) - 1 for tokens in full_prompts])
    return EncodedExamples(prefix[:shared], [tokens[shared:] for tokens in full_prompts],
                           np.asarray(targets, dtype=int), pair_ids, skipped)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _text_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def class_weights(targets: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """(n_classes,) loss weights: 'balanced' (n / (K * count)), 'sqrt' (its square root) or 'none' (ones).

    Classes absent from ``targets`` get weight 1.
    """
    weights = np.ones(n_classes, dtype=float)
    if mode == "none":
        return weights
    if mode not in ("balanced", "sqrt"):
        raise FinetuneError(f"unknown class weighting '{mode}' (use balanced, sqrt or none)")
    present = np.unique(targets)
    weights[present] = compute_class_weight("balanced", classes=present, y=targets)
    return np.sqrt(weights) if mode == "sqrt" else weights


# -- model ------------------------------------------------------------------------------------------
def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_lora_model(model_dir: str | Path, args: FinetuneArgs, adapter_dir: Path | None = None) -> Any:
    """The base model in float32 with a fresh (or ``adapter_dir``'s) trainable LoRA adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=list(args.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def prefix_cache(model: Any, prefix: list[int]) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per layer (keys, values) of the prefix, each (1, heads, P, head_dim)."""
    output = model(input_ids=torch.tensor([prefix]), use_cache=True)
    return tuple((layer.keys, layer.values) for layer in output.past_key_values.layers)


def answer_logits(model: Any, prefix_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], prefix_len: int,
                  suffixes: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """(B, vocab) next-token logits at the end of each prompt ``prefix + suffixes[b]``.

    The pair parts are right-padded and attend to the shared prefix cache, expanded to the batch.
    """
    from transformers import DynamicCache

    batch = len(suffixes)
    width = max(len(s) for s in suffixes)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for b, tokens in enumerate(suffixes):
        input_ids[b, : len(tokens)] = torch.tensor(tokens)
        mask[b, prefix_len: prefix_len + len(tokens)] = 1
    cache = DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                         for k, v in prefix_kv]) if prefix_len else None
    positions = torch.arange(prefix_len, prefix_len + width)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=mask, past_key_values=cache,
                             position_ids=positions.unsqueeze(0).expand(batch, -1), cache_position=positions,
                             use_cache=cache is not None).last_hidden_state
    last = torch.tensor([len(s) - 1 for s in suffixes])
    return causal_lm.lm_head(hidden[torch.arange(batch), last])


@torch.no_grad()
def score_label_logprobs(model: Any, examples: EncodedExamples, label_ids: Sequence[int], pad_id: int,
                         batch_size: int = 32) -> np.ndarray:
    """(n, K) full-vocabulary log-probabilities of each label token at the answer position."""
    was_training = model.training
    model.eval()
    prefix_kv = prefix_cache(model, examples.prefix) if examples.prefix else ()
    rows = []
    for start in range(0, len(examples.suffixes), batch_size):
        logits = answer_logits(model, prefix_kv, len(examples.prefix), examples.suffixes[start: start + batch_size], pad_id)
        rows.append(torch.log_softmax(logits.float(), dim=-1)[:, list(label_ids)].numpy())
    model.train(was_training)
    return np.concatenate(rows) if rows else np.zeros((0, len(label_ids)))


def dev_metrics(logprobs: np.ndarray, targets: np.ndarray, grades: Sequence[int], temperature: float = 1.0,
                raw_ratings: np.ndarray | None = None, rating_scale: tuple[float, float] | None = None,
                label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """`evaluate_labels` on the label probabilities ``softmax(logprobs / temperature)``."""
    probs = apply_temperature(logprobs, temperature)
    return evaluate_labels(targets, probs, grades, raw_ratings, rating_scale=rating_scale, label_names=label_names)


# -- training ---------------------------------------------------------------------------------------
def label_token_loss(logits: torch.Tensor, token_targets: torch.Tensor, class_targets: torch.Tensor,
                     label_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted loss on the answer token only.

    With z = logits (B, V) at the answer position, t_b the label's token, c_b its class and w_b its
    class weight::

        loss = sum_b w_b * (-log softmax(z_b)[t_b] - log softmax(z_b[label_ids])[c_b]) / sum_b w_b

    The first term is the usual SFT cross-entropy over the whole vocabulary (it keeps the label
    tokens the likeliest next tokens, which engines returning top-k logprobs need); the second is
    the cross-entropy of the distribution the labeler actually reports, renormalised over the labels.
    """
    full = F.cross_entropy(logits, token_targets, reduction="none")
    restricted = F.cross_entropy(logits[:, label_ids], class_targets, reduction="none")
    return ((full + restricted) * weights).sum() / weights.sum()


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless shuffled mini-batches of indices, epoch after epoch."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[start: start + batch_size]


ProgressFn = Callable[[dict[str, Any]], None]


def finetune(train: pd.DataFrame, dev: pd.DataFrame, policy: Policy, model_dir: str | Path, out_dir: str | Path,
             args: FinetuneArgs | None = None, *, base_model_name: str | None = None,
             rating_scale: tuple[float, float] | None = None, progress: ProgressFn | None = None,
             resume: bool = False) -> FinetuneResult:
    """Train a LoRA adapter on ``train``, select and calibrate it on ``dev``, save it to ``out_dir``.

    ``train`` and ``dev`` have columns pair_id, query_id, query, title, description, brand, label
    (and optionally raw_rating); no query_id may be in both. ``progress`` receives one dict per
    evaluation (step, epoch, train_loss, dev metrics, elapsed seconds). With ``resume`` a run
    interrupted in the same ``out_dir`` continues from its last checkpoint.
    """
    args = args or FinetuneArgs()
    out_dir = Path(out_dir)
    _check_split(train, dev)
    if args.select_metric not in {"qwk", "kappa", "accuracy", "macro_f1", "log_loss", "rmse_grade", "within_one_accuracy"}:
        raise FinetuneError(f"unknown select metric '{args.select_metric}'")
    started = time.monotonic()
    _set_seed(args.seed)
    tokenizer = load_tokenizer(model_dir)
    labels = policy.scheme.label_names
    grades = [policy.scheme.grades[name] for name in labels]
    label_ids = label_token_ids(tokenizer, policy.answer_options())
    train_examples = encode_examples(tokenizer, policy, train)
    dev_examples = encode_examples(tokenizer, policy, dev)
    if len(train_examples.targets) == 0 or len(dev_examples.targets) == 0:
        raise FinetuneError("no usable train or dev pairs after rendering the prompts")
    dev_ratings = _ratings_for(dev, dev_examples.pair_ids)
    weights = torch.tensor(class_weights(train_examples.targets, len(labels), args.class_weighting), dtype=torch.float32)
    label_id_tensor = torch.tensor(label_ids)
    class_targets = torch.tensor(train_examples.targets)
    targets = label_id_tensor[class_targets]
    train_weights = weights[torch.tensor(train_examples.targets)]
    pad_id = int(tokenizer.pad_token_id)

    checkpoint = out_dir / CHECKPOINT_DIR
    state = _load_checkpoint(checkpoint) if resume else None
    if state is None:
        (out_dir / HISTORY_FILE).unlink(missing_ok=True)
    model = load_lora_model(model_dir, args, checkpoint / "adapter" if state else None)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps)))
    step, history, best_value, best_state, bad_evals, spent_before = 0, [], None, None, 0, 0.0
    rng = np.random.default_rng(args.seed)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history, best_value, bad_evals = state["step"], state["history"], state["best_value"], state["bad_evals"]
        best_state, spent_before = state["best_state"], state["elapsed_s"]
        rng = np.random.default_rng(args.seed + step)

    def elapsed() -> float:
        return spent_before + time.monotonic() - started

    budget_s = args.max_minutes * 60 if args.max_minutes else math.inf
    n_train = len(train_examples.targets)
    max_steps = min(args.max_steps, max(1, math.ceil(args.max_epochs * n_train / args.batch_size)))
    batches = _batches(n_train, min(args.batch_size, n_train), rng)
    losses: list[float] = []
    step_seconds, eval_seconds = 0.0, 0.0
    stop_reason = "max_steps"
    while step < max_steps:
        if elapsed() + step_seconds + eval_seconds > budget_s:
            stop_reason = "max_minutes"
            break
        tick = time.monotonic()
        batch = next(batches)
        prefix_kv = prefix_cache(model, train_examples.prefix) if train_examples.prefix else ()
        logits = answer_logits(model, prefix_kv, len(train_examples.prefix),
                               [train_examples.suffixes[i] for i in batch], pad_id)
        loss = label_token_loss(logits, targets[batch], class_targets[batch], label_id_tensor, train_weights[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(float(loss.detach()))
        step_seconds = time.monotonic() - tick
        # the budget has no room for another step and its evaluation: evaluate this one, then stop
        last_in_budget = elapsed() + step_seconds + eval_seconds > budget_s
        if step % args.eval_every == 0 or step == max_steps or last_in_budget:
            tick = time.monotonic()
            logprobs = score_label_logprobs(model, dev_examples, label_ids, pad_id, args.eval_batch_size)
            metrics = dev_metrics(logprobs, dev_examples.targets, grades, 1.0, dev_ratings, rating_scale, labels)
            eval_seconds = time.monotonic() - tick
            record = {"step": step, "epoch": round(step * args.batch_size / n_train, 3),
                      "train_loss": float(np.mean(losses)), "elapsed_s": round(elapsed(), 1),
                      **{k: metrics[k] for k in ("accuracy", "macro_f1", "qwk", "log_loss", "rmse_grade", "ece")}}
            losses = []
            value = metrics[args.select_metric]
            if _better(args.select_metric, value, best_value):
                best_value, best_state, bad_evals = value, _lora_state(model), 0
                record["best"] = True
            else:
                bad_evals += 1
            history.append(record)
            _append_history(out_dir, record)
            _save_checkpoint(checkpoint, model, optimizer, scheduler, step, history, best_value, best_state,
                             bad_evals, elapsed())
            if progress:
                progress(record)
            if bad_evals >= args.patience:
                stop_reason = "early_stopping"
                break
    return _finish(model, tokenizer, policy, train, dev, train_examples, dev_examples, dev_ratings, label_ids, grades,
                   args, out_dir, best_state, history, step, stop_reason, elapsed(), base_model_name or str(model_dir),
                   rating_scale, pad_id)


def _finish(model: Any, tokenizer: Any, policy: Policy, train: pd.DataFrame, dev: pd.DataFrame,
            train_examples: EncodedExamples, dev_examples: EncodedExamples, dev_ratings: np.ndarray | None,
            label_ids: list[int], grades: list[int], args: FinetuneArgs, out_dir: Path,
            best_state: dict[str, torch.Tensor] | None, history: list[dict[str, Any]], step: int, stop_reason: str,
            elapsed_s: float, base_model_name: str, rating_scale: tuple[float, float] | None, pad_id: int) -> FinetuneResult:
    from peft import set_peft_model_state_dict

    if best_state is not None:
        set_peft_model_state_dict(model, best_state)
    labels = policy.scheme.label_names
    logprobs = score_label_logprobs(model, dev_examples, label_ids, pad_id, args.eval_batch_size)
    temperature = fit_temperature(logprobs, dev_examples.targets)
    uncalibrated = dev_metrics(logprobs, dev_examples.targets, grades, 1.0, dev_ratings, rating_scale, labels)
    calibrated = dev_metrics(logprobs, dev_examples.targets, grades, temperature, dev_ratings, rating_scale, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    meta = {
        "format": "mine-refine labeler adapter v1",
        "base_model": base_model_name,
        "scheme": policy.scheme.name,
        "labels": labels,
        "policy": policy.name,
        "policy_hash": policy.version,
        "data_hash": data_hash(pd.concat([train, dev])),
        "label_token_ids": label_ids,
        "temperature": temperature,
        "training_args": {**asdict(args), "target_modules": list(args.target_modules)},
        "n_train": len(train_examples.targets),
        "n_dev": len(dev_examples.targets),
        "skipped_pairs": len(train_examples.skipped) + len(dev_examples.skipped),
        "prefix_tokens": len(train_examples.prefix),
        "steps": step,
        "stop_reason": stop_reason,
        "train_seconds": round(elapsed_s, 1),
        "dev_metrics": _headline(calibrated),
        "dev_metrics_uncalibrated": _headline(uncalibrated),
        "dev_metrics_note": "dev is also used for early stopping and for fitting the temperature, so these are "
                            "optimistic; evaluate on held-out queries with `mnr eval-labeler`",
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    split = {"train_query_ids": sorted(set(train["query_id"])), "dev_query_ids": sorted(set(dev["query_id"])),
             "dev_query_texts": sorted(set(dev["query"].astype(str))), "dev_pair_ids": list(dev_examples.pair_ids)}
    (out_dir / SPLIT_FILE).write_text(json.dumps(split), encoding="utf-8")
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return FinetuneResult(out_dir, meta, history)


HEADLINE_KEYS = ("n", "accuracy", "macro_f1", "kappa", "qwk", "within_one_accuracy", "rmse_grade", "rmse_rating",
                 "log_loss", "ece")


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}


def _check_split(train: pd.DataFrame, dev: pd.DataFrame) -> None:
    if train.empty or dev.empty:
        raise FinetuneError(f"need both train and dev pairs (got {len(train)} train, {len(dev)} dev)")
    shared = set(train["query_id"]) & set(dev["query_id"])
    if shared:
        raise FinetuneError(f"{len(shared)} queries are in both train and dev (e.g. {sorted(shared)[0]}); split by query")


def _ratings_for(frame: pd.DataFrame, pair_ids: list[str]) -> np.ndarray | None:
    if "raw_rating" not in frame.columns:
        return None
    lookup = dict(zip(frame["pair_id"], frame["raw_rating"]))
    return np.array([lookup.get(p, np.nan) for p in pair_ids], dtype=float)


def _append_history(out_dir: Path, record: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / HISTORY_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, step: int, history: list, best_value: Any,
                     best_state: Any, bad_evals: int, elapsed_s: float) -> None:
    """Write the checkpoint beside, then swap it in, so a crash never leaves half of one."""
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging / "adapter"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "history": history, "best_value": best_value, "best_state": best_state, "bad_evals": bad_evals,
                "elapsed_s": elapsed_s}, staging / "state.pt")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not (path / "state.pt").is_file():
        return None
    return torch.load(path / "state.pt", weights_only=False)


def read_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of an adapter folder, with a clear error when it is not one."""
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise FinetuneError(f"{adapter_dir}: not a labeler adapter folder (no {META_FILE}); make one with `mnr finetune`")
    return json.loads(path.read_text(encoding="utf-8"))
