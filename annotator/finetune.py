"""LoRA fine-tuning of the labeler on human judgments under a written policy.

The labeler reads ``policy.render(pair)`` = the shared policy prefix + a short pair part ending at
``Label:``, and its answer is the first token of one of ``policy.answer_options()``. Fine-tuning
is supervised on that one token (`label_token_loss`): the cross-entropy of the next-token
distribution at the end of the prompt against the reference label's token, over the full vocabulary
and over the label tokens alone, weighted per class (ratings are skewed). No other token carries loss.

Policy flags are learnt beside the grade from human flag decisions (a ``flags`` column: per pair a dict
flag -> decision). A decided flag gives a flag prompt: the grade prompt, the pair's true label and
``Flag <name>:`` (`Policy.flag_suffix`), answered " yes" or " no" (`FLAG_OPTIONS`). The flag prompt holds
the grade prompt, so it is one training sequence with two answers: the grade, read where the grade prompt
ends, and the flag, read at its end (`sequence_loss`: the same loss on the flag's answer token, weighted
per answer). A pair with several decided flags gives one such sequence per flag, its grade counted once.
On dev each flag gets its own temperature (``meta["flag_temperatures"]``; one at a bound is a failed
calibration, as the grade's), and flags that no training label decides are reported
(`FlagsWithoutDecisionsWarning`, ``meta["flags_undecided"]``).

Two training paths (``FinetuneArgs.train_top_k``):

- cached (``train_top_k`` = k > 0, the default): LoRA on the top k decoder blocks only (`lora_targets`),
  plus the answer head's LoRA on lm_head, fitted at the end (`annotator.answer_head`). The frozen lower
  blocks' output for every pair is computed once and cached (`annotator.layer_cache`); each step runs
  only the top blocks, so a step costs about k/N of a full one and the caching pass one forward of the
  lower blocks per pair. Training pairs are cached in a random order until their share of the budget is
  spent: those are the pairs trained on, over several epochs.
- full (``train_top_k`` = 0): LoRA on every block; each step runs the policy prefix once (with the
  adapter, so gradients flow through it), shares its key/value cache across the batch and runs the
  pair parts.

The pair part is the policy's (``pair_form="full"``) or a short one (``"short"``: query, title,
brand, description cut hard; `annotator.pair_form`), recorded in ``meta.json`` so that labelling
renders the same prompt.

The train/dev split is by query (no query in both). Every ``eval_every`` steps the dev set is
scored; the best adapter by ``select_metric`` is kept (with flags learnt, plus their mean dev F1:
`selection_value`), training stops after ``patience`` evaluations
without improvement, at ``max_steps``, or when the ``max_minutes`` wall-clock budget is spent; that
budget covers the whole call (caching, training, dev scoring, calibration, saving). On the cached path
the pace measured while caching dev sizes the train cache; a budget that cannot fit ``min_steps`` steps
is a `FinetuneError` then, and a run that took no step is never saved as an adapter. A temperature is
then fitted on dev (`annotator.calibration`); one that ends at a bound of its search is reported as a
failed calibration (a warning, ``meta["calibration"]["status"] == "failed"``) and 1.0 is stored.
With ``args.stack`` (the default) the calibrated stack (`annotator.stack`: a logistic regression over the
dev label log-probabilities and the text baseline's lexical features) is fitted on dev and saved beside the
adapter (``stack.json``, ``stack.npz``); ``meta["stack"]`` holds its version and cross-validated dev report.
The output folder holds the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), ``meta.json`` and ``split.json``.
``checkpoint/`` inside it makes an interrupted run resumable.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import GroupShuffleSplit, train_test_split
from sklearn.utils.class_weight import compute_class_weight

from annotator.answer_head import HEAD_MODULE, choose_head, freeze_head, has_head_module, head_rank, write_head
from annotator.calibration import apply_temperature, fit_temperature
from annotator.decision import decide_by_cutoffs, decision_record
from annotator.evaluation import evaluate_labels
from annotator.judged import JUDGED_COUNTS, JudgedSettings, judged_examples
from annotator.layer_cache import lm_head_of
from annotator.prompts import FLAG_OPTIONS, EmptyProductTextError, PairText, Policy
from annotator.scoring import label_token_ids
from labelstore import ids
from labelstore.errors import MnrError
from labelstore.schemes import LabelScheme

if TYPE_CHECKING:
    from annotator.stack import RetrieverCosine

META_FILE = "meta.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_DIR = "checkpoint"
LOWER_IS_BETTER = {"log_loss", "rmse_grade", "rmse_rating", "ece"}
log = logging.getLogger(__name__)
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneError(MnrError):
    """Fine-tuning cannot start or continue with these inputs."""


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16); elsewhere it is emulated, slower
    than float32."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)  # private in torch: absent means no


def resolve_compute_dtype(name: str) -> torch.dtype:
    """`FinetuneArgs.compute_dtype` as a torch dtype ("auto": bfloat16 on a CPU with native bf16, else float32)."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    if name not in COMPUTE_DTYPES:
        raise FinetuneError(f"unknown compute dtype '{name}' (use auto, float32 or bfloat16)")
    return COMPUTE_DTYPES[name]


def compute_in(dtype: torch.dtype) -> Any:
    """The context the training arithmetic runs in: CPU autocast to ``dtype`` (nothing for float32)."""
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


@dataclass
class FinetuneArgs:
    """Training arguments; all of them go into ``meta.json``."""

    lora_r: int = 8
    lora_alpha: int = 16
    # no dropout: at 0.05 its random masks took 35% of a bfloat16 step (SmolLM2, top 4 blocks, 32 Home Depot
    # pairs: 1.05 s against 0.78 s), and a run makes one or two passes over its pairs, not many
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_LORA_MODULES
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    # after warm-up: "constant" keeps the rate; "linear" decays it to 0 at the end of the training budget (by time
    # under max_minutes, else by max_steps), as "Budgeted Training" (Li, Yumer and Ramanan, ICLR 2020) recommends.
    # On the 30-minute Home Depot run it was ahead at equal steps (dev QWK 0.307 against 0.287 at step 400) but
    # not at the end (test QWK 0.296 against 0.312, 436 steps against 510), so the default stays constant
    lr_schedule: str = "constant"
    batch_size: int = 32
    max_steps: int = 2000
    # dev selection keeps the best checkpoint, so the cap only stops a small set from idling the budget away: at
    # 3.0 the 30-minute CrowdFlower run (5,818 pairs) stopped at 1,238 s with its dev QWK still rising (0.18, 0.28,
    # 0.32 over the last three evaluations)
    max_epochs: float = 6.0
    eval_every: int = 100
    patience: int = 4
    max_minutes: float | None = None
    class_weighting: str = "balanced"  # balanced | sqrt | none
    select_metric: str = "qwk"
    dev_fraction: float = 0.2
    # "query": dev queries have no train pair (a labeler for new queries); "pair": dev pairs drawn at random,
    # their queries in train too (a labeler that finishes queries people started). Selection, the temperature
    # and the stack fit dev, so they learn whichever case dev stands for: CrowdFlower's random-pair test, 30 min,
    # query-disjoint dev: stack QWK 0.42 against the text baseline's 0.64
    dev_split: str = "query"
    max_train: int | None = None
    max_dev: int | None = 1000
    eval_batch_size: int = 32
    seed: int = 0
    # LoRA on the top `train_top_k` blocks over cached lower-block states (0: every block, no cache)
    train_top_k: int = 4
    pair_form: str = "short"  # full | short (see annotator.pair_form)
    cache_memory_gb: float = 4.0  # resident layer cache; beyond it the cache is a memmap in out_dir
    cache_share: float = 0.8  # most of the budget left after dev caching that caching train pairs may take
    # caching train pairs stops where the pairs cached could still be trained on this many times in the budget left
    # (at the measured caching and step paces): the issue's target is 20,000 distinct pairs, more than one pass
    target_epochs: float = 1.5
    dev_cache_share: float = 0.15  # most of the budget that caching dev pairs may take
    cache_batch_size: int = 64
    min_steps: int = 10  # a budget that cannot fit this many steps (by the measured caching pace) is an error
    stack: bool = True  # fit the calibrated stack (annotator.stack) on the dev scores at the end
    lexical_share: float = 0.15  # most of the budget that fitting the stack's text baseline may take
    # the flag answers' loss beside the grade's: at 1.0 learning a flag held the grade back (tiny-model test:
    # grade dev accuracy 0.25 after 60 steps, against 0.68 at 0.3 and 1.0 without flags)
    flag_weight: float = 0.3
    # with flags learnt, the adapter kept is chosen by the grade's select_metric plus the flags' mean dev F1 (or
    # log-loss, for a lower-is-better metric): on a 30-minute Home Depot run the grade's best QWK came at step 100
    # (flag F1 0.39), while the flag went on to F1 0.86 by step 1000
    select_with_flags: bool = True
    # the answer token's whole-vocabulary cross-entropy beside the one over the labels (`label_token_loss`). Every
    # backend renormalises over the label tokens (allowed_token_ids), so serving needs only the second; the first
    # spends early steps on making the labels the likeliest next tokens (CrowdFlower, 4 min: train loss 7.8 over
    # the first 25 steps at 1.0, 2.1 at 0.0). Kept at 1.0 until a full-budget run shows which labels better.
    vocab_loss_weight: float = 1.0
    # precision of the training arithmetic only (caching the train pairs' lower blocks, training steps): "auto" is
    # bfloat16 where this CPU multiplies it natively (AMX or AVX512-BF16), else float32. Weights, gradients and the
    # optimiser stay float32, and dev is cached and scored in float32, as the labeler serves, so selection, the
    # temperature and the stack see the served model's numbers. Xeon with AMX: a forward ran 2.2x faster
    compute_dtype: str = "auto"  # auto | float32 | bfloat16
    # a linear head on the last hidden state, fitted in closed form at the end and served as a LoRA on lm_head
    # (annotator.answer_head); kept only where it beats the adapter without it on dev. Cached path only
    answer_head: bool = True
    head_penalties: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # dev chose 0.3 (CrowdFlower), 0.003 (Home Depot)
    # train pairs the head is fitted on, drawn at random: their states cost a top-block forward each, and on
    # CrowdFlower all 5,818 took 162 s of the 30 minutes, while 2,048 already gave a frozen model dev QWK 0.35
    head_train_pairs: int | None = 2000
    # judged examples in the pair part (annotator.judged; short form only): the label counts of the query's
    # judged pairs and its `judged_examples` nearest judged titles; 0: none. `judged_skip_share` of the train
    # pairs are shown none, so the adapter also labels queries nobody has judged
    judged_examples: int = 0
    judged_skip_share: float = 0.2
    # when the label counts line is shown (`JudgedSettings.counts`): "beyond_k" only where the query has more judged
    # pairs than the nearest line lists (a fifth fewer pair-part tokens on Home Depot); "always" as before
    judged_counts: str = "beyond_k"
    # the short pair part also shows how many query words the title holds (annotator.word_match), a count
    # that carries over to queries the adapter never trained on
    match_hint: bool = False

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise FinetuneError(f"unknown learning-rate schedule '{self.lr_schedule}' (use {' or '.join(LR_SCHEDULES)})")
        if self.compute_dtype != "auto" and self.compute_dtype not in COMPUTE_DTYPES:
            raise FinetuneError(f"unknown compute dtype '{self.compute_dtype}' (use auto, float32 or bfloat16)")

    def record(self) -> dict[str, Any]:
        """The settings as ``meta.json`` stores them (``training_args``), JSON-ready."""
        return {**asdict(self), "target_modules": list(self.target_modules), "head_penalties": list(self.head_penalties)}


LR_SCHEDULES = ("linear", "constant")


@dataclass
class EncodedExamples:
    """Token ids of a set of training sequences: ``prefix`` (shared) and ``suffixes[i]`` (sequence i's own part).

    A sequence is a pair's grade prompt, or a flag prompt (the grade prompt + `Policy.flag_suffix` of the
    pair's true label and a flag), which holds the grade prompt too. Per sequence: ``targets`` the grade
    class (-1: its pair's grade is learnt from another sequence), ``grade_at`` where in the suffix the grade
    answer is read, ``flags`` the flag index asked at its end (-1: none) and ``flag_targets`` the answer
    (0: yes, 1: no; -1: none). Without flags there is one sequence per pair, ending at its grade answer.
    """

    prefix: list[int]
    suffixes: list[list[int]]
    targets: np.ndarray
    pair_ids: list[str]
    skipped: list[str] = field(default_factory=list)
    grade_at: np.ndarray | None = None
    flags: np.ndarray | None = None
    flag_targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.suffixes)
        if self.grade_at is None:
            self.grade_at = np.asarray([len(s) - 1 for s in self.suffixes], dtype=np.int64)
        if self.flags is None:
            self.flags = np.full(n, -1, dtype=np.int64)
        if self.flag_targets is None:
            self.flag_targets = np.full(n, -1, dtype=np.int64)

    @property
    def grade_rows(self) -> np.ndarray:
        """Positions of the sequences that carry their pair's grade (one per pair)."""
        return np.flatnonzero(self.targets >= 0)

    @property
    def flag_rows(self) -> np.ndarray:
        """Positions of the flag sequences."""
        return np.flatnonzero(self.flags >= 0)

    @property
    def grade_targets(self) -> np.ndarray:
        return self.targets[self.grade_rows]

    @property
    def grade_pair_ids(self) -> list[str]:
        return [self.pair_ids[i] for i in self.grade_rows]

    def take(self, index: Sequence[int]) -> "EncodedExamples":
        """The sequences at positions ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return EncodedExamples(self.prefix, [self.suffixes[i] for i in index], self.targets[index],
                               [self.pair_ids[i] for i in index], self.skipped, self.grade_at[index],
                               self.flags[index], self.flag_targets[index])


@dataclass
class FinetuneResult:
    out_dir: Path
    meta: dict[str, Any]
    history: list[dict[str, Any]]


# -- data -------------------------------------------------------------------------------------------
DEV_SPLITS = ("query", "pair")


def split_dev(frame: pd.DataFrame, dev_fraction: float, seed: int = 0, *, by: str = "query",
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split pairs into (train, dev): ``by`` "query" keeps every query on one side (`split_by_query`; dev
    measures the labeler on queries it has not seen), "pair" draws dev pairs at random, so dev queries also
    have train pairs (the labeler finishes queries people have started: selection, temperature and stack
    then fit that)."""
    if by == "query":
        return split_by_query(frame, dev_fraction, seed)
    if by != "pair":
        raise FinetuneError(f"unknown dev split '{by}' (use {' or '.join(DEV_SPLITS)})")
    if len(frame) < 2:
        raise FinetuneError("need at least two pairs to split train/dev")
    train_idx, dev_idx = train_test_split(np.arange(len(frame)), test_size=dev_fraction, random_state=seed)
    return frame.iloc[np.sort(train_idx)].reset_index(drop=True), frame.iloc[np.sort(dev_idx)].reset_index(drop=True)


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
    """A hash of the (pair_id, label, flag decisions) set: the same labels give the same hash, in any order."""
    flags = frame["flags"] if "flags" in frame.columns else [None] * len(frame)
    rows = sorted(f"{p}={lbl}" + _flags_key(decided) for p, lbl, decided in zip(frame["pair_id"], frame["label"], flags))
    return ids.stable_hash(*rows, length=16)


def _flags_key(decided: Any) -> str:
    if not isinstance(decided, dict) or not decided:
        return ""
    return "|" + ",".join(f"{name}={decided[name]}" for name in sorted(decided))


def encode_examples(tokenizer: Any, policy: Policy, frame: pd.DataFrame) -> EncodedExamples:
    """Tokenise the prompts of ``frame`` (columns pair_id, query, title, description, brand, label and,
    optionally, ``flags``: per pair a dict flag name -> decision (True: set) or None).

    Each prompt is tokenised whole, as an engine would, then cut into the policy prefix (shared) and
    the pair part. A pair with flag decisions gives one flag prompt per decided flag (policy order); the
    first also carries the grade, whose answer position lies inside it. Pairs with no usable text are
    skipped and listed in ``skipped``.
    """
    label_index = {name: i for i, name in enumerate(policy.scheme.label_names)}
    flag_index = {name: i for i, name in enumerate(policy.flag_names)}
    decisions = frame["flags"] if "flags" in frame.columns else pd.Series([None] * len(frame), index=frame.index)
    prefix = tokenizer(policy.prefix())["input_ids"]
    prompts: list[str] = []
    # (grade prompt's index, flag prompt's index or -1, pair id, target, flag, flag target)
    rows: list[tuple[int, int, str, int, int, int]] = []
    skipped: list[str] = []
    for row, decided in zip(frame.itertuples(index=False), decisions):
        pair = PairText(query=row.query, title=row.title, description=_text_or_none(row.description),
                        brand=_text_or_none(row.brand), pair_id=row.pair_id, judged=getattr(row, "judged", None))
        try:
            prompt = policy.render(pair)
        except EmptyProductTextError:
            skipped.append(row.pair_id)
            continue
        label = policy.scheme.normalize(row.label)
        target = label_index[label]
        asked = _decided_flags(decided, flag_index, row.pair_id)
        grade_prompt = len(prompts)
        prompts.append(prompt)
        if not asked:
            rows.append((grade_prompt, -1, row.pair_id, target, -1, -1))
        for position, (flag, answer) in enumerate(asked):
            rows.append((grade_prompt, len(prompts), row.pair_id, target if position == 0 else -1, flag,
                         0 if answer else 1))
            prompts.append(prompt + policy.flag_suffix(label, policy.flag_names[flag]))
    tokens: list[list[int]] = tokenizer(prompts)["input_ids"] if prompts else []
    sequences: list[list[int]] = []
    kept: list[tuple[str, int, int, int]] = []  # per sequence: pair id, target, flag, flag target
    grade_ends: list[int] = []
    for grade_prompt, flag_prompt, pair_id, target, flag, answer in rows:
        grade_tokens = tokens[grade_prompt]
        if flag_prompt >= 0 and target >= 0 and tokens[flag_prompt][:len(grade_tokens)] != grade_tokens:
            # the label's token merged with the prompt's last one: read the grade from its own prompt
            sequences.append(grade_tokens)
            kept.append((pair_id, target, -1, -1))
            grade_ends.append(len(grade_tokens) - 1)
            target = -1
        sequences.append(tokens[flag_prompt] if flag_prompt >= 0 else grade_tokens)
        kept.append((pair_id, target, flag, answer))
        grade_ends.append(len(grade_tokens) - 1)
    shared = len(prefix)
    for sequence in sequences:
        if sequence[:shared] != prefix[:shared]:  # rare: the pair part's first token merged with the prefix's last
            shared = _common_prefix_length(prefix[:shared], sequence)
    # every pair part must keep at least one token so the answer position is its own
    shared = min([shared] + [end for end in grade_ends])
    return EncodedExamples(prefix[:shared], [sequence[shared:] for sequence in sequences],
                           np.asarray([r[1] for r in kept], dtype=int), [r[0] for r in kept], skipped,
                           np.asarray(grade_ends, dtype=np.int64) - shared,
                           np.asarray([r[2] for r in kept], dtype=np.int64),
                           np.asarray([r[3] for r in kept], dtype=np.int64))


def _decided_flags(decided: Any, flag_index: dict[str, int], pair_id: str) -> list[tuple[int, bool]]:
    """(flag index, decision) of the decided flags of one pair, in policy order."""
    if decided is None or (isinstance(decided, float) and math.isnan(decided)):
        return []
    if not isinstance(decided, dict):
        raise FinetuneError(f"pair {pair_id}: field 'flags' must map flag names to decisions, got {decided!r}")
    unknown = sorted(set(decided) - set(flag_index))
    if unknown:
        raise FinetuneError(f"pair {pair_id}: field 'flags': the policy declares no flag {', '.join(unknown)} "
                            f"(its flags: {', '.join(flag_index) or 'none'})")
    return sorted((flag_index[name], bool(value)) for name, value in decided.items() if value is not None)


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
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        freeze_head(model)
        return model
    n_layers = int(base.config.num_hidden_layers)
    top = list(range(max(0, n_layers - args.train_top_k), n_layers)) if 0 < args.train_top_k < n_layers else None
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=lora_targets(args.target_modules, top, head=args.answer_head and top is not None),
                        bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # a LoRA on a tied lm_head: merging unties it first (annotator.backends.merged), so the warning is handled
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*", category=UserWarning)
        model = get_peft_model(base, config)
    freeze_head(model)
    return model


def lora_targets(modules: Sequence[str], layers: Sequence[int] | None, *, head: bool) -> list[str] | str:
    """PEFT ``target_modules``: ``modules`` in decoder blocks ``layers`` (None: every block), plus lm_head for
    the answer head. PEFT's ``layers_to_transform`` would drop lm_head (it is in no block), so blocks and head
    are named by one pattern (PEFT full-matches a string against each module's name)."""
    if not head and layers is None:
        return list(modules)
    blocks = r"\d+" if layers is None else "|".join(str(layer) for layer in layers)
    return rf"(.*\.layers\.({blocks})\.(self_attn|mlp)\.({'|'.join(modules)}))" + (f"|{HEAD_MODULE}" if head else "")


def prefix_cache(model: Any, prefix: list[int]) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per layer (keys, values) of the prefix, each (1, heads, P, head_dim)."""
    output = model(input_ids=torch.tensor([prefix]), use_cache=True)
    return tuple((layer.keys, layer.values) for layer in output.past_key_values.layers)


def pair_forward(model: Any, prefix_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], prefix_len: int,
                 suffixes: Sequence[Sequence[int]], pad_id: int, *, hidden_states: bool = False) -> Any:
    """The decoder's output over the pair parts ``suffixes``, right-padded after the shared prefix (its cache
    ``prefix_kv``, expanded to the batch); with ``hidden_states`` every layer's states too."""
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
    return causal_lm.model(input_ids=input_ids, attention_mask=mask, past_key_values=cache,
                           position_ids=positions.unsqueeze(0).expand(batch, -1), cache_position=positions,
                           use_cache=cache is not None, output_hidden_states=hidden_states)


def answer_logits(model: Any, prefix_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], prefix_len: int,
                  suffixes: Sequence[Sequence[int]], pad_id: int, at: np.ndarray | None = None) -> torch.Tensor:
    """(B, vocab) next-token logits at the end of each prompt ``prefix + suffixes[b]``; with ``at`` (B, P)
    positions in each suffix, (B, P, vocab) logits there.

    The pair parts are right-padded and attend to the shared prefix cache, expanded to the batch.
    """
    batch = len(suffixes)
    hidden = pair_forward(model, prefix_kv, prefix_len, suffixes, pad_id).last_hidden_state
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if at is None:
        picked = hidden[torch.arange(batch), torch.tensor([len(s) - 1 for s in suffixes])]
    else:
        picked = hidden[torch.arange(batch)[:, None], torch.as_tensor(np.asarray(at), dtype=torch.long)]
    with torch.autocast("cpu", enabled=False):  # the answer logits in float32 whatever the blocks ran in
        return causal_lm.lm_head(picked.float())


@dataclass
class Scores:
    """Dev scores: ``grade`` (n, K) label log-probabilities of the grade sequences (`EncodedExamples.grade_rows`)
    and ``flag`` (m, 2) log-probabilities of FLAG_OPTIONS at the end of the flag sequences (``flag_rows``)."""

    grade: np.ndarray
    flag: np.ndarray


def answer_positions(examples: EncodedExamples, rows: np.ndarray) -> np.ndarray:
    """(B, 2) where sequences ``rows`` are read: the grade answer and the flag answer (their last token).

    (B, 1), the grade answer alone, when the examples hold no flag sequence.
    """
    if not (examples.flags >= 0).any():
        return examples.grade_at[rows][:, None]
    last = np.asarray([len(examples.suffixes[i]) - 1 for i in rows], dtype=np.int64)
    return np.column_stack([examples.grade_at[rows], last])


@torch.no_grad()
def score_rows(model: Any, logits_at: Callable[[np.ndarray], torch.Tensor], examples: EncodedExamples,
               label_ids: Sequence[int], flag_ids: Sequence[int], batch_size: int = 32) -> Scores:
    """`Scores` of every sequence of ``examples``; ``logits_at(rows)`` gives the (B, P, vocab) logits at
    `answer_positions`."""
    was_training = model.training
    model.eval()
    grade_rows, flag_rows = [], []
    for start in range(0, len(examples.suffixes), batch_size):
        rows = np.arange(start, min(start + batch_size, len(examples.suffixes)))
        log_probs = torch.log_softmax(logits_at(rows).float(), dim=-1)
        grade = examples.targets[rows] >= 0
        flag = examples.flags[rows] >= 0
        grade_rows.append(log_probs[grade, 0][:, list(label_ids)].numpy())
        if flag.any():
            flag_rows.append(log_probs[flag, -1][:, list(flag_ids)].numpy())
    model.train(was_training)
    return Scores(np.concatenate(grade_rows) if grade_rows else np.zeros((0, len(label_ids))),
                  np.concatenate(flag_rows) if flag_rows else np.zeros((0, len(flag_ids) or 2)))


def score_examples(model: Any, examples: EncodedExamples, label_ids: Sequence[int], flag_ids: Sequence[int],
                   pad_id: int, batch_size: int = 32) -> Scores:
    """`Scores` of ``examples`` with the full model, the prefix run once."""
    with torch.no_grad():
        prefix_kv = prefix_cache(model, examples.prefix) if examples.prefix else ()

    def logits_at(rows: np.ndarray) -> torch.Tensor:
        return answer_logits(model, prefix_kv, len(examples.prefix), [examples.suffixes[i] for i in rows], pad_id,
                             at=answer_positions(examples, rows))

    return score_rows(model, logits_at, examples, label_ids, flag_ids, batch_size)


def score_label_logprobs(model: Any, examples: EncodedExamples, label_ids: Sequence[int], pad_id: int,
                         batch_size: int = 32) -> np.ndarray:
    """(n, K) full-vocabulary log-probabilities of each label token at the grade answer of each pair."""
    return score_examples(model, examples, label_ids, [], pad_id, batch_size).grade


def dev_metrics(logprobs: np.ndarray, targets: np.ndarray, grades: Sequence[int], temperature: float = 1.0,
                raw_ratings: np.ndarray | None = None, rating_scale: tuple[float, float] | None = None,
                label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """`evaluate_labels` on the label probabilities ``softmax(logprobs / temperature)``."""
    probs = apply_temperature(logprobs, temperature)
    return evaluate_labels(targets, probs, grades, raw_ratings, rating_scale=rating_scale, label_names=label_names)


# -- training ---------------------------------------------------------------------------------------
def label_token_loss(logits: torch.Tensor, token_targets: torch.Tensor, class_targets: torch.Tensor,
                     label_ids: torch.Tensor, weights: torch.Tensor, vocab_weight: float = 1.0) -> torch.Tensor:
    """Class-weighted loss on the answer token only.

    With z = logits (B, V) at the answer position, t_b the label's token, c_b its class and w_b its
    class weight::

        loss = sum_b w_b * (-a * log softmax(z_b)[t_b] - log softmax(z_b[label_ids])[c_b]) / sum_b w_b

    The first term, weighted by a = ``vocab_weight``, is the usual SFT cross-entropy over the whole
    vocabulary (it keeps the label tokens the likeliest next tokens); the second is the cross-entropy
    of the distribution the labeler actually reports, renormalised over the labels (every backend
    restricts the answer to the label tokens, so serving reads only this one).
    """
    full = F.cross_entropy(logits, token_targets, reduction="none")
    restricted = F.cross_entropy(logits[:, label_ids], class_targets, reduction="none")
    return ((vocab_weight * full + restricted) * weights).sum() / weights.sum()


@dataclass
class SequenceTargets:
    """What the loss reads per training sequence, as tensors (n,): whether it carries its pair's grade, the
    class, its token and class weight (0 where none); whether it asks a flag, the answer (0: yes, 1: no), its
    token and its weight (balanced per flag like the grade's classes; 0 where none)."""

    grade: torch.Tensor
    classes: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor
    flag: torch.Tensor
    answers: torch.Tensor
    answer_tokens: torch.Tensor
    answer_weights: torch.Tensor
    label_ids: torch.Tensor
    flag_ids: torch.Tensor
    flag_weight: float = 1.0
    vocab_weight: float = 1.0


def sequence_targets(examples: EncodedExamples, label_ids: Sequence[int], flag_ids: Sequence[int], n_classes: int,
                     weighting: str, flag_weight: float = 1.0, vocab_weight: float = 1.0) -> SequenceTargets:
    """`SequenceTargets` of ``examples``' sequences, class weights by ``weighting`` (`class_weights`)."""
    grade = examples.targets >= 0
    classes = np.where(grade, examples.targets, 0)
    weights = np.where(grade, class_weights(examples.targets[grade], n_classes, weighting)[classes], 0.0)
    flag = examples.flags >= 0
    answers = np.where(flag, examples.flag_targets, 0)
    answer_weights = np.zeros(len(answers))
    for index in np.unique(examples.flags[flag]):
        rows = examples.flags == index
        answer_weights[rows] = class_weights(answers[rows], 2, weighting)[answers[rows]]
    label_t, flag_t = torch.tensor(list(label_ids)), torch.tensor(list(flag_ids) or [0, 0])
    classes_t, answers_t = torch.tensor(classes), torch.tensor(answers)
    return SequenceTargets(torch.tensor(grade), classes_t, label_t[classes_t], torch.tensor(weights, dtype=torch.float32),
                           torch.tensor(flag), answers_t, flag_t[answers_t],
                           torch.tensor(answer_weights, dtype=torch.float32), label_t, flag_t, flag_weight,
                           vocab_weight)


def sequence_loss(logits: torch.Tensor, targets: SequenceTargets, batch: np.ndarray) -> tuple[torch.Tensor, float | None]:
    """The batch's loss and its flag part, unweighted (None: no flag sequence in the batch).

    ``logits`` (B, P, vocab) at `answer_positions` of the sequences ``batch`` (positions in ``targets``):
    `label_token_loss` of the grade answers (column 0) plus ``targets.flag_weight`` times the same loss of the
    flag answer token (column -1) over FLAG_OPTIONS: the loss is on the grade and flag answer tokens only.
    """
    index = torch.as_tensor(np.asarray(batch), dtype=torch.long)
    grade, flag = targets.grade[index], targets.flag[index]
    loss = logits.new_zeros(())
    if grade.any():
        rows = index[grade]
        loss = loss + label_token_loss(logits[grade, 0], targets.tokens[rows], targets.classes[rows], targets.label_ids,
                                       targets.weights[rows], targets.vocab_weight)
    if not flag.any():
        return loss, None
    rows = index[flag]
    flag_loss = label_token_loss(logits[flag, -1], targets.answer_tokens[rows], targets.answers[rows],
                                 targets.flag_ids, targets.answer_weights[rows], targets.vocab_weight)
    return loss + targets.flag_weight * flag_loss, float(flag_loss.detach())


def flag_metrics(flag_logprobs: np.ndarray, examples: EncodedExamples, flag_names: Sequence[str],
                 temperatures: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per flag with sequences in ``examples``: n, positives, log-loss, accuracy, precision, recall and F1 at
    P(yes) >= 0.5, with P(yes) = sigmoid((lp_yes - lp_no) / T) (``temperatures``, default 1).

    ``flag_logprobs`` (m, 2) are the scores of ``examples.flag_rows``, in order.
    """
    from sklearn.metrics import log_loss, precision_recall_fscore_support

    rows = examples.flag_rows
    result: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(flag_names):
        mine = examples.flags[rows] == index
        if not mine.any():
            continue
        truth = (examples.flag_targets[rows][mine] == 0).astype(int)
        temperature = (temperatures or {}).get(name, 1.0)
        prob = flag_probability(flag_logprobs[mine], temperature)
        chosen = (prob >= 0.5).astype(int)
        precision, recall, f1, _ = precision_recall_fscore_support(truth, chosen, average="binary", zero_division=0)
        result[name] = {"n": int(mine.sum()), "positives": int(truth.sum()),
                        "log_loss": float(log_loss(truth, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])),
                        "accuracy": float(np.mean(chosen == truth)), "precision": float(precision),
                        "recall": float(recall), "f1": float(f1), "temperature": temperature}
    return result


def flag_probability(flag_logprobs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(m,) P(flag applies) = sigmoid((lp_yes - lp_no) / T) of (m, 2) FLAG_OPTIONS log-probabilities."""
    return apply_temperature(np.asarray(flag_logprobs, dtype=float), temperature)[:, 0]


def selection_value(metric: str, grade_value: float, flags: dict[str, dict[str, float]]) -> float:
    """What picks the adapter when flags are learnt: the grade's ``metric`` plus the flags' mean dev F1 (a
    higher-is-better metric) or mean dev log-loss (a lower-is-better one); ``flags`` {name: dev metrics}."""
    key = "log_loss" if metric in LOWER_IS_BETTER else "f1"
    return float(grade_value + np.mean([values[key] for values in flags.values()]))


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    # without the flag PEFT copies the whole (tied) lm_head weight beside the head's LoRA at every best
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


ProgressFn = Callable[[dict[str, Any]], None]
FINISH_MARGIN_S = 3.0  # saving the adapter, meta.json and split.json


class CalibrationFailedWarning(UserWarning):
    """The fitted temperature ended at a bound of its search: it calibrates nothing."""


@dataclass
class LoopState:
    """What the training loop carries from step to step; the first fields are checkpointed."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_logprobs: np.ndarray | None = None  # dev scores of the best adapter: no rescoring at the end
    bad_evals: int = 0
    spent_s: float = 0.0  # seconds spent by earlier, interrupted attempts
    pairs_seen: int = 0  # training examples processed, repeats included
    n_dev: int | None = None  # dev pairs cached (cached path): a resumed run scores the same ones
    n_take: int | None = None  # train pairs encoded for the layer cache (cached path)
    n_cached: int | None = None  # of which cached, the pairs trained on
    losses: list[float] = field(default_factory=list)
    flag_losses: list[float] = field(default_factory=list)  # the flag part of `losses`, of batches with flags
    step_seconds: float = 0.0
    train_wall_s: float = 0.0  # in steps, this attempt
    train_cpu_s: float = 0.0
    eval_seconds: float | None = None
    stop_reason: str = "max_steps"
    train_started_s: float | None = None  # the clock when the first training step began (the schedule's origin)


CHECKPOINTED = ("step", "history", "best_value", "best_state", "best_logprobs", "bad_evals", "pairs_seen", "n_dev",
                "n_take", "n_cached", "train_started_s")


@dataclass
class Clock:
    """The whole command's wall-clock budget, interrupted attempts included."""

    started: float
    limit_s: float = math.inf
    spent_before: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of this attempt, in order

    def elapsed(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def phase(self, name: str) -> None:
        """Record the seconds since the previous phase ended (or since the start) as phase ``name``."""
        self.phases[name] = round(self.elapsed() - self.spent_before - sum(self.phases.values()), 1)

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def deadline(self, *, share: float, reserve_s: float = 0.0) -> float:
        """``time.monotonic()`` at which ``share`` of what is left, less ``reserve_s``, is spent."""
        if math.isinf(self.limit_s):
            return math.inf
        return time.monotonic() + max(0.0, share * (self.left() - reserve_s))


@dataclass
class TrainingPath:
    """How a step gets its answer logits and how dev is scored: the full model, or the top blocks over
    the layer cache. ``train_index`` lists the trainable pairs (positions in the train examples)."""

    train_index: np.ndarray
    lengths: np.ndarray
    logits: Callable[[np.ndarray], torch.Tensor]  # train rows -> (B, P, vocab) at `answer_positions`
    score_dev: Callable[[], Scores]
    dev_index: np.ndarray
    info: dict[str, Any]
    eval_estimate_s: float | None = None  # scoring dev once, predicted before any evaluation ran
    # ("train" | "dev", rows) -> (B, H) final normed states at the grade answer, for the answer head (None: none)
    answer_states: Callable[[str, np.ndarray], torch.Tensor] | None = None
    full_pair_s: float | None = None  # a sequence through the whole model (None: about a dev evaluation's per pair)


def full_path(*, model: Any, train_examples: EncodedExamples, dev_examples: EncodedExamples, label_ids: list[int],
              flag_ids: list[int], pad_id: int, eval_batch_size: int, dtype: torch.dtype = torch.float32) -> TrainingPath:
    """Every step runs the whole model (in ``dtype``: `compute_in`); the prefix once per step, shared by the batch.
    Dev is scored in float32."""
    prefix = train_examples.prefix

    def logits(batch: np.ndarray) -> torch.Tensor:
        with compute_in(dtype):
            prefix_kv = prefix_cache(model, prefix) if prefix else ()
            logits_low = answer_logits(model, prefix_kv, len(prefix), [train_examples.suffixes[i] for i in batch],
                                       pad_id, at=answer_positions(train_examples, batch))
        return logits_low.float()  # the loss's log-softmax over the vocabulary in float32

    def score_dev() -> Scores:
        return score_examples(model, dev_examples, label_ids, flag_ids, pad_id, eval_batch_size)

    n = len(train_examples.targets)
    return TrainingPath(np.arange(n), _lengths(train_examples), logits, score_dev,
                        np.arange(len(dev_examples.targets)), {"path": "full", "compute_dtype": str(dtype)})


def cached_path(*, model: Any, split: int, train: pd.DataFrame, dev_examples: EncodedExamples,
                encode: Callable[[pd.DataFrame], EncodedExamples], encode_seconds_per_pair: float,
                label_ids: list[int], flag_ids: list[int], args: FinetuneArgs, clock: Clock, state: LoopState, spill_dir: Path,
                key: str, dtype: torch.dtype = torch.float32) -> tuple[TrainingPath, EncodedExamples]:
    """Lower blocks run once per pair into a `LayerCache`; steps run the top blocks over it.

    Dev is cached first (at most ``dev_cache_share`` of the budget); its measured pace (`CachePace`)
    decides whether ``args.min_steps`` steps fit at all (else `FinetuneError`) and how many train pairs,
    drawn at random, are encoded and cached: as many as the time left after them can train on
    ``target_epochs`` times (`CachePace.cache_seconds`). The pairs cached are
    the pairs trained on; a resumed run caches the same ones again (or reuses a spilled cache with the
    same ``key``). Train pairs are cached and stepped on in ``dtype`` (`compute_in`), at a pace measured on a few
    dev pairs; dev is cached and scored in float32. Returns the path and the encoded train pairs, in cache order.
    """
    from annotator import layer_cache as lc

    hidden_size = int(model.get_base_model().config.hidden_size)
    dev = _cache_dev(model=model, split=split, dev_examples=dev_examples, args=args, clock=clock, n_dev=state.n_dev)
    state.n_dev = len(dev.index)
    n_layers = int(model.get_base_model().config.num_hidden_layers)
    pace = CachePace(prefix_s=dev.prefix_seconds, pair_s=dev.cache.fill_seconds / max(1, dev.cache.filled),
                     encode_s=encode_seconds_per_pair, top_share=(n_layers - split) / max(1, split))
    if dtype != torch.float32 and state.n_cached is None and not math.isinf(clock.limit_s):
        pace.train_cache_s = _train_cache_pace(model, dev, dev_examples, args, dtype)
    reserve_s = 2 * pace.eval_s(len(dev.index)) + FINISH_MARGIN_S
    if state.n_cached is None:
        _check_budget(pace, args=args, clock=clock, n_dev=len(dev.index))
    cache_s = pace.cache_seconds(args=args, clock=clock, reserve_s=reserve_s, n_dev=len(dev.index))
    n_take = state.n_take or (len(train) if math.isinf(cache_s) else
                              int(min(len(train), max(args.batch_size, 1.5 * cache_s / pace.train_pair_s))))
    state.n_take = n_take
    tick, cpu_tick = time.monotonic(), time.process_time()
    rows = np.random.default_rng(args.seed + 1).permutation(len(train))[:n_take]
    train_examples = encode(train.iloc[rows].reset_index(drop=True))
    if train_examples.prefix != dev_examples.prefix:  # a pair part merged with the prefix's last token
        common = _common_prefix_length(train_examples.prefix, dev_examples.prefix)
        train_examples, dev_examples = _reprefix(train_examples, common), _reprefix(dev_examples, common)
        dev = _cache_dev(model=model, split=split, dev_examples=dev_examples, args=args, clock=clock,
                         n_dev=state.n_dev)
    dev_cache, dev_index, prefix = dev.cache, dev.index, dev.prefix
    lengths = _lengths(train_examples)
    cache = lc.reuse_spilled(spill_dir, key, lengths) if state.n_cached else None
    if cache is None:
        cache = lc.allocate_cache(lengths, hidden_size, max_resident_bytes=int(args.cache_memory_gb * 2**30),
                                  spill_dir=spill_dir, dtype=lc.cache_dtype_for(model))
    # the deadline counts from now, so the encoding above comes out of the caching time
    deadline = math.inf if state.n_cached else tick + cache_s
    if not state.n_cached and not math.isinf(clock.limit_s) and len(lengths) >= args.batch_size:
        # one batch cached, one timed step on it: the step's real cost (it can be 3x the forward pace's
        # prediction on a busy machine) sets how long caching may go on
        with compute_in(dtype):
            lc.fill_cache(model, prefix, train_examples.suffixes, cache, order=np.arange(len(lengths)),
                          batch_size=args.cache_batch_size, stop_after=args.batch_size)
        pace.measured_step_s = _probe_step(model, prefix, cache, args.batch_size, dtype)
        _check_budget(pace, args=args, clock=clock, n_dev=len(dev_index))
        deadline = time.monotonic() + pace.cache_seconds(args=args, clock=clock, reserve_s=reserve_s,
                                                         n_dev=len(dev.index))
    with compute_in(dtype):
        n_cached = lc.fill_cache(model, prefix, train_examples.suffixes, cache, order=np.arange(len(lengths)),
                                 batch_size=args.cache_batch_size, deadline=deadline, stop_after=state.n_cached,
                                 at_least=args.batch_size)
    train_seconds, train_cpu_seconds = time.monotonic() - tick, time.process_time() - cpu_tick
    log.info("encoded %d and cached %d of %d train pairs in %.1fs (%.1fs into the budget)", len(lengths), n_cached,
             len(train), train_seconds, clock.elapsed())
    spilled = isinstance(cache.rows, np.memmap)
    if spilled:
        cache.rows.flush()
        lc.mark_ready(spill_dir, key, n_cached)
    state.n_cached = n_cached

    def logits(batch: np.ndarray) -> torch.Tensor:
        hidden, batch_lengths = cache.batch(batch)
        with compute_in(dtype):
            logits_low = lc.top_block_logits(model, prefix, hidden, batch_lengths,
                                             at=answer_positions(train_examples, batch))
        return logits_low.float()  # the loss's log-softmax over the vocabulary in float32

    cached_dev = dev_examples.take(dev_index)

    def dev_logits(rows: np.ndarray) -> torch.Tensor:
        hidden, batch_lengths = dev_cache.batch(dev_index[rows])
        return lc.top_block_logits(model, prefix, hidden, batch_lengths, at=answer_positions(cached_dev, rows))

    def score_dev() -> Scores:
        return score_rows(model, dev_logits, cached_dev, label_ids, flag_ids, batch_size=args.eval_batch_size)

    def answer_states(which: str, rows: np.ndarray) -> torch.Tensor:
        if which == "train":
            hidden, batch_lengths = cache.batch(rows)
            at = answer_positions(train_examples, rows)
        else:
            hidden, batch_lengths = dev_cache.batch(dev_index[rows])
            at = answer_positions(cached_dev, rows)
        return lc.top_block_states(model, prefix, hidden, batch_lengths, at=at)[:, 0]

    info = {"path": "cached", "split": split, "top_k": args.train_top_k, "prefix_tokens": prefix.length,
            "compute_dtype": str(dtype),
            "cache_dtype": lc.cache_dtype_name(cache.rows.dtype), "cache_spilled": spilled, "cache_bytes": cache.nbytes,
            "cache_bytes_per_token": hidden_size * cache.rows.itemsize, "train_pairs_cached": n_cached,
            "train_tokens_cached": int(cache.lengths[:n_cached].sum()),
            "train_encode_and_cache_seconds": round(train_seconds, 1),
            "train_cache_pairs_per_s": round(n_cached / max(train_seconds, 1e-9), 2),
            "train_cache_cpu_seconds": round(train_cpu_seconds, 1),
            "dev_pairs_cached": len(dev_index), "dev_cache_seconds": round(dev.seconds, 1),
            "train_cache_pace_probe_pairs_per_s": (round(1 / pace.train_cache_s, 2) if pace.train_cache_s else None),
            "prefix_seconds": round(dev.prefix_seconds, 2), "dev_cache_pairs_per_s": round(1 / pace.pair_s, 2),
            "estimated_step_seconds": round(pace.step_s(args.batch_size), 2)}
    path = TrainingPath(np.arange(n_cached), lengths[:n_cached], logits, score_dev, dev_index, info,
                        eval_estimate_s=pace.eval_s(len(dev_index)), full_pair_s=pace.pair_s * n_layers / max(1, split),
                        answer_states=answer_states)
    return path, train_examples


# a training step's forward + backward in forward passes: the frozen weights need no weight gradients
# (SmolLM2, top 4 blocks, batch 32: 4.5 s a step measured against 5.3 s predicted with 2)
BACKWARD_FACTOR = 2.0


@dataclass
class CachePace:
    """Measured seconds of the cached path's pieces and what they predict.

    ``pair_s``: a pair through the lower blocks (the caching pace); ``prefix_s``: the prefix through them,
    once; ``encode_s``: rendering and tokenising a pair; ``top_share``: the top blocks' cost relative to the
    lower blocks' (k / split).
    """

    prefix_s: float
    pair_s: float
    encode_s: float
    top_share: float
    measured_step_s: float | None = None  # a real training step, once one was timed
    train_cache_s: float | None = None  # a train pair through the lower blocks, when train pairs cache in another dtype

    @property
    def train_pair_s(self) -> float:
        """Encoding and caching one train pair."""
        return (self.train_cache_s or self.pair_s) + self.encode_s

    def step_s(self, batch_size: int) -> float:
        """A training step: the batch (in the train pairs' dtype) and the prefix through the top blocks, forward and
        backward."""
        if self.measured_step_s is not None:
            return self.measured_step_s
        return BACKWARD_FACTOR * self.top_share * (batch_size * (self.train_cache_s or self.pair_s) + self.prefix_s)

    def eval_s(self, n_dev: int) -> float:
        """Scoring the cached dev pairs (forward through the top blocks)."""
        return self.top_share * (n_dev * self.pair_s + self.prefix_s)

    def cache_seconds(self, *, args: FinetuneArgs, clock: Clock, reserve_s: float, n_dev: int) -> float:
        """Seconds for encoding and caching train pairs, of what is left after ``reserve_s``: the share that
        caches as many pairs as the rest can train on ``args.target_epochs`` times (steps and the dev evaluations
        between them), at most ``cache_share``, and never so much that ``args.min_steps`` steps no longer fit."""
        if math.isinf(clock.limit_s):
            return math.inf
        left = clock.left() - reserve_s
        batch = args.batch_size
        train_s = (self.step_s(batch) + self.eval_s(n_dev) / max(1, args.eval_every)) / batch  # per pair, per pass
        share = self.train_pair_s / (self.train_pair_s + args.target_epochs * train_s)
        return max(0.0, min(args.cache_share * left, share * left, left - _min_steps(args) * self.step_s(batch)))


TRAIN_PACE_PROBE = 32  # dev pairs cached (twice, the second timed) to measure the train caching pace in its dtype


def _train_cache_pace(model: Any, dev: "DevCache", dev_examples: EncodedExamples, args: FinetuneArgs,
                      dtype: torch.dtype) -> float | None:
    """Seconds per pair through the lower blocks in ``dtype``, timed on dev pairs into a scratch cache; the first
    pass warms the kernels up and is not timed. None when too few dev pairs are cached to time."""
    from annotator import layer_cache as lc

    rows = dev.index[:TRAIN_PACE_PROBE]
    if len(rows) < 8:
        return None
    suffixes = [dev_examples.suffixes[i] for i in rows]
    seconds = 0.0
    for _ in range(2):
        scratch = lc.allocate_cache(_lengths(dev_examples)[rows], dev.cache.rows.shape[1],
                                    max_resident_bytes=2**62, spill_dir=None, dtype=dev.cache.rows.dtype)
        with compute_in(dtype):
            lc.fill_cache(model, dev.prefix, suffixes, scratch, order=np.arange(len(rows)),
                          batch_size=args.cache_batch_size)
        seconds = scratch.fill_seconds
    return seconds / len(rows)


def _min_steps(args: FinetuneArgs) -> int:
    return max(1, min(args.min_steps, args.max_steps))


def _probe_step(model: Any, prefix: Any, cache: Any, batch_size: int, dtype: torch.dtype = torch.float32) -> float:
    """Seconds of a forward (in ``dtype``) and backward pass over the first ``batch_size`` cached pairs, the second
    of two (the first warms the kernels up; cold, it can take several times as long); no update is kept."""
    from annotator import layer_cache as lc

    seconds = 0.0
    for _ in range(2):
        tick = time.monotonic()
        hidden, lengths = cache.batch(np.arange(batch_size))
        with compute_in(dtype):
            logits = lc.top_block_logits(model, prefix, hidden, lengths)
        logits.float().logsumexp(dim=-1).mean().backward()
        model.zero_grad(set_to_none=True)
        seconds = time.monotonic() - tick
    return seconds


def _check_budget(pace: CachePace, *, args: FinetuneArgs, clock: Clock, n_dev: int) -> None:
    """Raise `FinetuneError` when the budget left cannot cache one batch and take ``args.min_steps`` steps."""
    if math.isinf(clock.limit_s):
        return
    min_steps = _min_steps(args)
    evals = max(1, math.ceil(min_steps / max(1, args.eval_every)))
    need_s = (args.batch_size * pace.train_pair_s + min_steps * pace.step_s(args.batch_size)
              + evals * pace.eval_s(n_dev) + FINISH_MARGIN_S)
    if need_s <= clock.left():
        return
    total_s = clock.elapsed() + need_s
    raise FinetuneError(
        f"--max-minutes {clock.limit_s / 60:g} is too small to train: {clock.elapsed():.0f}s went on "
        f"{', '.join(f'{name} {seconds:.0f}s' for name, seconds in clock.phases.items())} and caching {n_dev} dev "
        f"pairs ({1 / pace.pair_s:.1f} pairs/s through the frozen blocks on this machine now), "
        f"and caching one batch of {args.batch_size} train pairs, {min_steps} steps "
        f"(about {pace.step_s(args.batch_size):.1f}s each) and evaluating would take {need_s:.0f}s more; "
        f"give at least --max-minutes {math.ceil(total_s * 1.2 / 60 * 2) / 2:g}, fewer dev pairs (--max-dev) "
        f"or a smaller --batch-size")


@dataclass
class DevCache:
    """The shared prefix's states and the dev pairs cached (rows ``index`` of the dev examples)."""

    cache: Any  # annotator.layer_cache.LayerCache
    index: np.ndarray
    prefix: Any  # annotator.layer_cache.PrefixStates
    seconds: float
    prefix_seconds: float


def _cache_dev(*, model: Any, split: int, dev_examples: EncodedExamples, args: FinetuneArgs, clock: Clock,
               n_dev: int | None) -> DevCache:
    """The prefix states and the dev pairs' cache (as many as ``dev_cache_share`` of the budget allows)."""
    from annotator import layer_cache as lc

    tick = time.monotonic()
    prefix = lc.prefix_states(model, dev_examples.prefix, split)
    prefix_seconds = time.monotonic() - tick
    dev_lengths = _lengths(dev_examples)
    dev_cache = lc.allocate_cache(dev_lengths, int(model.get_base_model().config.hidden_size),
                                  max_resident_bytes=2**62, spill_dir=None, dtype=lc.cache_dtype_for(model))
    dev_order = np.random.default_rng(args.seed).permutation(len(dev_lengths))
    n_dev = lc.fill_cache(model, prefix, dev_examples.suffixes, dev_cache, order=dev_order,
                          batch_size=args.cache_batch_size, stop_after=n_dev, at_least=args.eval_batch_size,
                          deadline=math.inf if n_dev else clock.deadline(share=args.dev_cache_share))
    seconds = time.monotonic() - tick
    log.info("cached %d of %d dev pairs in %.1fs (prefix %.1fs; %.1fs into the budget)", n_dev, len(dev_lengths),
             seconds, prefix_seconds, clock.elapsed())
    return DevCache(dev_cache, np.sort(dev_order[:n_dev]), prefix, seconds, prefix_seconds)


def _reprefix(examples: EncodedExamples, length: int) -> EncodedExamples:
    """``examples`` with only the first ``length`` prefix tokens shared, the rest moved into each pair part."""
    moved = examples.prefix[length:]
    return EncodedExamples(examples.prefix[:length], [moved + s for s in examples.suffixes], examples.targets,
                           examples.pair_ids, examples.skipped, examples.grade_at + len(moved), examples.flags,
                           examples.flag_targets)


def _lengths(examples: EncodedExamples) -> np.ndarray:
    return np.asarray([len(s) for s in examples.suffixes], dtype=np.int64)


def finetune(train: pd.DataFrame, dev: pd.DataFrame, policy: Policy, model_dir: str | Path, out_dir: str | Path,
             args: FinetuneArgs | None = None, *, base_model_name: str | None = None,
             rating_scale: tuple[float, float] | None = None, progress: ProgressFn | None = None,
             resume: bool = False, started_at: float | None = None, stack_lexical: Any = None,
             stack_cosine: RetrieverCosine | None = None,
             label_sources: Sequence[str] = JudgedSettings.sources) -> FinetuneResult:
    """Train a LoRA adapter on ``train``, select and calibrate it on ``dev``, save it to ``out_dir``.

    ``train`` and ``dev`` have columns pair_id, query_id, query, title, description, brand, label
    (and optionally raw_rating); no query_id may be in both. ``progress`` receives one dict per
    evaluation (step, epoch, train_loss, dev metrics, elapsed seconds). With ``resume`` a run
    interrupted in the same ``out_dir`` continues from its last checkpoint. ``args.max_minutes``
    bounds the whole call from ``started_at`` (``time.monotonic()``; default: now), caching, dev
    scoring and calibration included.

    With ``args.stack`` the text baseline is fitted on ``train`` first (or ``stack_lexical``, one already
    fitted on it, is used) and, at the end, the calibrated stack (`annotator.stack`) on the dev scores:
    it is saved beside the adapter and its dev report goes into ``meta["stack"]``. ``stack_cosine`` adds the
    retriever's query-title cosine to the stack's inputs (the labeler applying it then needs that retriever).
    ``label_sources``: the store's label sources ``train`` came from; labelling draws judged examples
    (``args.judged_examples``) from the same ones.
    """
    args = args or FinetuneArgs()
    out_dir = Path(out_dir)
    _check_split(train, dev, args.dev_split)
    if stack_cosine is not None and not args.stack:
        raise FinetuneError("the retriever's cosine is an input of the stack, and this run fits none (stack=False)")
    dtype = resolve_compute_dtype(args.compute_dtype)
    if args.select_metric not in {"qwk", "kappa", "accuracy", "macro_f1", "log_loss", "rmse_grade", "within_one_accuracy"}:
        raise FinetuneError(f"unknown select metric '{args.select_metric}'")
    from annotator.pair_form import policy_in_form

    clock = Clock(time.monotonic() if started_at is None else started_at,
                  args.max_minutes * 60 if args.max_minutes else math.inf)
    _set_seed(args.seed)
    judged = judged_settings(args, label_sources)
    prompt_policy = policy_in_form(policy, args.pair_form, judged=judged is not None, match=args.match_hint,
                                   judged_counts=_judged_counts(judged))
    if judged is not None:
        train, dev = with_judged(train, dev, policy.scheme, judged, seed=args.seed)
    tokenizer = load_tokenizer(model_dir)
    label_ids = label_token_ids(tokenizer, prompt_policy.answer_options())
    flag_ids = label_token_ids(tokenizer, list(FLAG_OPTIONS)) if prompt_policy.flags else []
    checkpoint = out_dir / CHECKPOINT_DIR
    saved = _load_checkpoint(checkpoint) if resume else None
    state = LoopState(**{k: saved[k] for k in CHECKPOINTED if k in saved}, spent_s=saved["elapsed_s"]) if saved else LoopState()
    clock.spent_before = state.spent_s
    if saved is None:
        (out_dir / HISTORY_FILE).unlink(missing_ok=True)

    def encode(frame: pd.DataFrame) -> EncodedExamples:
        return encode_examples(tokenizer, prompt_policy, frame)

    clock.phase("setup")
    undecided = undecided_flags(train, prompt_policy.flag_names)
    if undecided:
        warnings.warn(f"policy '{policy.name}' declares flag(s) {', '.join(undecided)} that no training label "
                      "decides: they are not learnt (set or clear them in the review UI)", FlagsWithoutDecisionsWarning,
                      stacklevel=2)
    lexical = _lexical_part(train, dev, prompt_policy, args, clock, stack_lexical, stack_cosine)
    clock.phase("text_baseline")
    tick = time.monotonic()
    dev_examples = encode(dev)
    encode_seconds_per_pair = (time.monotonic() - tick) / max(1, len(dev))
    model = load_lora_model(model_dir, args, checkpoint / "adapter" if saved else None)
    model.train()
    clock.phase("encode_dev_and_load_model")
    split = _split_block(model, args.train_top_k)
    if split is None:
        train_examples = encode(train)
        _check_encoded(train_examples, dev_examples)
        path = full_path(model=model, train_examples=train_examples, dev_examples=dev_examples, label_ids=label_ids,
                         flag_ids=flag_ids, pad_id=int(tokenizer.pad_token_id), eval_batch_size=args.eval_batch_size,
                         dtype=dtype)
    else:
        _check_encoded(dev_examples)
        key = ids.stable_hash(data_hash(train), str(model_dir), split, prompt_policy.version, args.seed, str(dtype),
                              repr(judged))
        path, train_examples = cached_path(model=model, split=split, train=train, dev_examples=dev_examples,
                                           encode=encode, encode_seconds_per_pair=encode_seconds_per_pair,
                                           label_ids=label_ids, flag_ids=flag_ids, args=args, clock=clock, state=state,
                                           spill_dir=out_dir / "layer-cache", key=key, dtype=dtype)
        _check_encoded(train_examples, dev_examples)
    dev_examples = _take(dev_examples, path.dev_index)
    clock.phase("caching")
    trainer = _Trainer(model=model, path=path, args=args, policy=prompt_policy, label_ids=label_ids,
                       flag_ids=flag_ids, train_examples=train_examples, dev_examples=dev_examples,
                       dev_ratings=_ratings_for(dev, dev_examples.grade_pair_ids), rating_scale=rating_scale,
                       out_dir=out_dir, clock=clock, progress=progress)
    if saved is not None:
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.scheduler.load_state_dict(saved["scheduler"])
    trainer.run(state)
    clock.phase("training")
    if state.step == 0:  # never save the untrained base model as an adapter
        raise FinetuneError(f"no training step fitted in --max-minutes {args.max_minutes:g}: "
                            f"{clock.elapsed():.0f}s went on loading and caching; give a larger budget")
    return _finish(trainer=trainer, state=state, policy=policy, prompt_policy=prompt_policy,
                   train=train, dev=dev, train_examples=train_examples, tokenizer=tokenizer,
                   base_model_name=base_model_name or str(model_dir), lexical=lexical, judged=judged)


def judged_settings(args: FinetuneArgs, sources: Sequence[str] = JudgedSettings.sources) -> JudgedSettings | None:
    """How the run shows judged examples (`annotator.judged`), or None for a run without them."""
    if args.judged_examples < 0 or not 0.0 <= args.judged_skip_share < 1.0:
        raise FinetuneError(f"judged_examples must be >= 0 (is {args.judged_examples}) and judged_skip_share in "
                            f"[0, 1) (is {args.judged_skip_share})")
    if args.judged_examples == 0:
        return None
    if args.judged_counts not in JUDGED_COUNTS:
        raise FinetuneError(f"unknown judged counts '{args.judged_counts}' (use {', '.join(JUDGED_COUNTS)})")
    return JudgedSettings(k=args.judged_examples, skip_share=args.judged_skip_share, sources=tuple(sources),
                          counts=args.judged_counts)


def _judged_counts(judged: JudgedSettings | None) -> str:
    """The counts rule of the pair template (`annotator.pair_form`); a run without examples renders none."""
    return judged.counts if judged is not None else "always"


def with_judged(train: pd.DataFrame, dev: pd.DataFrame, scheme: LabelScheme, judged: JudgedSettings, *,
                seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``train`` and ``dev`` with a ``judged`` column: examples drawn from the train pairs (a train pair never
    sees itself; ``judged.skip_share`` of them see none), as labelling draws them from the store's judged pairs."""
    pool = train[["pair_id", "query", "title"]].assign(label=[scheme.normalize(label) for label in train["label"]])
    names = scheme.label_names
    return (train.assign(judged=judged_examples(train, pool, names, k=judged.k, skip_share=judged.skip_share,
                                                seed=seed, counts=judged.counts)),
            dev.assign(judged=judged_examples(dev, pool, names, k=judged.k, counts=judged.counts)))


def _check_encoded(*sets: EncodedExamples) -> None:
    if any(len(examples.targets) == 0 for examples in sets):
        raise FinetuneError("no usable train or dev pairs after rendering the prompts")


def _split_block(model: Any, top_k: int) -> int | None:
    """The first trainable block of the cached path, or None for the full path (``top_k`` 0)."""
    if top_k <= 0:
        return None
    n_layers = int(model.get_base_model().config.num_hidden_layers)
    return max(0, n_layers - top_k)


def _take(examples: EncodedExamples, index: np.ndarray) -> EncodedExamples:
    if len(index) == len(examples.targets):
        return examples
    return examples.take(index)


class _Trainer:
    """The optimisation loop over a `TrainingPath`, with evaluation, selection and checkpoints."""

    def __init__(self, *, model: Any, path: TrainingPath, args: FinetuneArgs, policy: Policy, label_ids: list[int],
                 flag_ids: list[int], train_examples: EncodedExamples, dev_examples: EncodedExamples,
                 dev_ratings: np.ndarray | None, rating_scale: tuple[float, float] | None, out_dir: Path, clock: Clock,
                 progress: ProgressFn | None):
        self.model, self.path, self.args, self.clock, self.progress = model, path, args, clock, progress
        self.out_dir, self.dev_examples, self.dev_ratings, self.rating_scale = out_dir, dev_examples, dev_ratings, rating_scale
        self.labels = policy.scheme.label_names
        self.flag_names = policy.flag_names
        self.grades = [policy.scheme.grades[name] for name in self.labels]
        self.label_ids, self.flag_ids = label_ids, flag_ids
        self.targets = sequence_targets(train_examples.take(path.train_index), label_ids, flag_ids, len(self.labels),
                                        args.class_weighting, args.flag_weight, args.vocab_loss_weight)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                           weight_decay=args.weight_decay)
        self.n_train = len(path.train_index)
        self.max_steps = min(args.max_steps, max(1, math.ceil(args.max_epochs * self.n_train / args.batch_size)))
        self.progress_done = 0.0  # share of the training budget spent, set after each step for the schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.n_grade = int(self.targets.grade.sum())
        self.uses_head = (args.answer_head and path.answer_states is not None and has_head_module(model)
                          and len(label_ids) <= head_rank(model))
        self.n_train_pairs = len(set(train_examples.take(path.train_index).pair_ids))
        self.save_seconds = 0.0

    def _lr_factor(self, step: int) -> float:
        """The learning rate's multiplier for the step after `step` steps: linear warm-up, then the schedule."""
        warm = min(1.0, (step + 1) / max(1, self.args.warmup_steps))
        if self.args.lr_schedule == "constant":
            return warm
        return warm * max(0.0, 1.0 - self.progress_done)

    def _budget_progress(self, state: LoopState) -> float:
        """Share of the training budget spent: of the steps allowed, or of the time from the first step to where
        the loop must stop (`_out_of_time` with no step left), whichever is further."""
        by_steps = state.step / self.max_steps
        if math.isinf(self.clock.limit_s) or state.train_started_s is None:
            return min(1.0, by_steps)
        eval_s = state.eval_seconds if state.eval_seconds is not None else self._eval_estimate(state)
        end_s = self.clock.limit_s - eval_s - self._finish_estimate(state, eval_s)
        span = end_s - state.train_started_s
        by_time = (self.clock.elapsed() - state.train_started_s) / span if span > 0 else 1.0
        return min(1.0, max(by_steps, by_time))

    def run(self, state: LoopState) -> None:
        args = self.args
        max_steps = self.max_steps
        if state.train_started_s is None:
            state.train_started_s = self.clock.elapsed()
        batches = length_batches(self.path.lengths, args.batch_size, np.random.default_rng(args.seed + state.step))
        while state.step < max_steps:
            if self._out_of_time(state, steps=1):
                state.stop_reason = "max_minutes"
                break
            self._step(state, next(batches))
            if state.step % args.eval_every == 0 or state.step == max_steps or self._out_of_time(state, steps=1):
                self._evaluate(state)
                if state.bad_evals >= args.patience:
                    state.stop_reason = "early_stopping"
                    break

    def _out_of_time(self, state: LoopState, *, steps: int) -> bool:
        """No room for ``steps`` more steps, an evaluation and saving the result."""
        eval_s = state.eval_seconds if state.eval_seconds is not None else self._eval_estimate(state)
        finish_s = self._finish_estimate(state, eval_s)
        return self.clock.elapsed() + steps * state.step_seconds + eval_s + finish_s > self.clock.limit_s

    def _finish_estimate(self, state: LoopState, eval_s: float) -> float:
        """Seconds kept for what follows the loop: saving, rescoring dev flags, the answer head."""
        return FINISH_MARGIN_S + self.save_seconds + self._rescore_estimate(eval_s) + self._head_estimate(state, eval_s)

    def _rescore_estimate(self, eval_s: float) -> float:
        """Asking every dev flag again after the predicted grade (`flags_after_predicted_grade`), at most."""
        n_flags = len(self.dev_examples.flag_rows)
        if not n_flags:
            return 0.0
        if self.path.full_pair_s is not None:
            return n_flags * self.path.full_pair_s
        return eval_s * n_flags / max(1, len(self.dev_examples.targets))

    def _head_estimate(self, state: LoopState, eval_s: float) -> float:
        """Fitting the answer head: the train pairs' states (a forward, a third of a step), the fits, and scoring
        dev again with the head."""
        if not self.uses_head:
            return 0.0
        n_head = min(self.n_grade, self.args.head_train_pairs or self.n_grade)
        forward_s = state.step_seconds * n_head / max(1, self.args.batch_size) / (1 + BACKWARD_FACTOR)
        return forward_s + HEAD_FIT_S_PER_PAIR * n_head * len(self.args.head_penalties) + 2 * eval_s

    def _eval_estimate(self, state: LoopState) -> float:
        if self.path.eval_estimate_s is not None:  # the cached path's, from its measured caching pace
            return self.path.eval_estimate_s
        # scoring is a forward pass (about a third of a training step per pair)
        return state.step_seconds * len(self.dev_examples.targets) / max(1, self.args.batch_size) / 3

    def _step(self, state: LoopState, batch: np.ndarray) -> None:
        tick, cpu_tick = time.monotonic(), time.process_time()
        logits = self.path.logits(self.path.train_index[batch])
        loss, flag_loss = sequence_loss(logits, self.targets, batch)
        if flag_loss is not None:
            state.flag_losses.append(flag_loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        state.step += 1
        self.progress_done = self._budget_progress(state)
        self.scheduler.step()
        state.pairs_seen += len(batch)
        state.losses.append(float(loss.detach()))
        state.step_seconds = time.monotonic() - tick
        state.train_wall_s += state.step_seconds
        state.train_cpu_s += time.process_time() - cpu_tick

    def _evaluate(self, state: LoopState) -> None:
        tick = time.monotonic()
        logprobs = self.path.score_dev()
        metrics = dev_metrics(logprobs.grade, self.dev_examples.grade_targets, self.grades, 1.0, self.dev_ratings,
                              self.rating_scale, self.labels)
        record = {"step": state.step, "epoch": round(state.pairs_seen / self.n_train, 3),
                  "train_loss": float(np.mean(state.losses)), "elapsed_s": round(self.clock.elapsed(), 1),
                  "lr": float(self.scheduler.get_last_lr()[0]),
                  **{k: metrics[k] for k in ("accuracy", "macro_f1", "qwk", "log_loss", "rmse_grade", "ece")}}
        if len(logprobs.flag):
            flags = flag_metrics(logprobs.flag, self.dev_examples, self.flag_names)
            record["flags"] = {name: {k: m[k] for k in ("log_loss", "f1", "accuracy")} for name, m in flags.items()}
        if state.flag_losses:
            record["train_flag_loss"] = float(np.mean(state.flag_losses))
        state.flag_losses = []
        state.losses = []
        value = metrics[self.args.select_metric]
        if self.args.select_with_flags and "flags" in record and record["flags"]:
            value = selection_value(self.args.select_metric, value, record["flags"])
            record["select_value"] = value
        if _better(self.args.select_metric, value, state.best_value):
            state.best_value, state.best_state, state.best_logprobs, state.bad_evals = value, _lora_state(self.model), logprobs, 0
            record["best"] = True
        else:
            state.bad_evals += 1
        state.history.append(record)
        _append_history(self.out_dir, record)
        saving = time.monotonic()
        _save_checkpoint(self.out_dir / CHECKPOINT_DIR, model=self.model, optimizer=self.optimizer,
                         scheduler=self.scheduler, state=state, elapsed_s=self.clock.elapsed())
        # the final save writes as much as a checkpoint: what it took sets the margin kept for it
        self.save_seconds = time.monotonic() - saving
        state.eval_seconds = time.monotonic() - tick
        if self.progress:
            self.progress(record)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Endless mini-batches of similar length (positions into ``lengths``), epoch after epoch."""
    from annotator.layer_cache import length_bucketed_batches

    for _, batch in length_bucketed_batches(lengths, batch_size, rng):
        yield batch


def calibrate(logprobs: np.ndarray, targets: np.ndarray, what: str = "calibration") -> tuple[float, dict[str, Any]]:
    """The temperature to store and a record of the fit for ``meta.json``.

    A fit that ends at a bound of `TEMPERATURE_BOUNDS` found no interior optimum (e.g. scores that
    carry no information about the labels, which the largest T flattens to the prior): it is
    reported as failed with a warning, and the identity temperature 1.0 is stored instead.
    """
    from annotator.calibration import TEMPERATURE_BOUNDS

    fitted = fit_temperature(logprobs, targets)
    low, high = TEMPERATURE_BOUNDS
    record: dict[str, Any] = {"status": "ok", "fitted_temperature": fitted, "bounds": [low, high]}
    if fitted >= high * 0.99 or fitted <= low * 1.01:
        why = ("the dev scores carry (almost) no information about the labels" if fitted > 1 else
               "dev is separated perfectly, so the likelihood keeps rising as T shrinks")
        record["status"] = "failed"
        record["reason"] = f"the fitted temperature {fitted:.3g} is at a bound of the search [{low}, {high}]: {why}"
        warnings.warn(f"{what} failed: {record['reason']}; storing temperature 1.0", CalibrationFailedWarning,
                      stacklevel=2)
        return 1.0, record
    return fitted, record


def calibrate_flags(flag_logprobs: np.ndarray, examples: EncodedExamples,
                    flag_names: Sequence[str]) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Per flag, the temperature of P(yes) = sigmoid((lp_yes - lp_no) / T) fitted on its dev sequences
    (`calibrate`: one at a bound is a failed calibration, stored as 1.0) and the record of the fit; a flag
    with no dev decision keeps 1.0. ``flag_logprobs`` (m, 2) are the scores of ``examples.flag_rows``."""
    flags = examples.flags[examples.flag_rows]
    answers = examples.flag_targets[examples.flag_rows]
    temperatures: dict[str, float] = {}
    records: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(flag_names):
        mine = flags == index
        if not mine.any():
            temperatures[name] = 1.0
            records[name] = {"status": "no dev decisions", "n_dev": 0}
            continue
        temperatures[name], records[name] = calibrate(flag_logprobs[mine], answers[mine], f"calibration of flag '{name}'")
        records[name]["n_dev"] = int(mine.sum())
    return temperatures, records


def undecided_flags(frame: pd.DataFrame, flag_names: Sequence[str]) -> list[str]:
    """The flags of ``flag_names`` that no pair of ``frame`` (column ``flags``, if any) has a decision on."""
    decided = set()
    if "flags" in frame.columns:
        for decisions in frame["flags"]:
            if isinstance(decisions, dict):
                decided |= {name for name, value in decisions.items() if value is not None}
    return [name for name in flag_names if name not in decided]


class FlagsWithoutDecisionsWarning(UserWarning):
    """The policy declares flags that no training label decides: fine-tuning cannot learn them."""


def _flags_meta(trainer: _Trainer, train_examples: EncodedExamples, flag_logprobs: np.ndarray,
                temperatures: dict[str, float], calibration: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ``meta.json`` records of the flags (nothing for a policy without flags)."""
    if not trainer.flag_names:
        return {}
    counts = {}
    for name_index, name in enumerate(trainer.flag_names):
        train_rows = train_examples.flags == name_index
        counts[name] = {"train_yes": int((train_examples.flag_targets[train_rows] == 0).sum()),
                        "train_no": int((train_examples.flag_targets[train_rows] == 1).sum())}
    return {"flag_names": list(trainer.flag_names), "flag_token_ids": list(trainer.flag_ids),
            "flag_temperatures": temperatures, "flag_calibration": calibration, "flag_decisions": counts,
            "flags_undecided": [name for name, c in counts.items() if c["train_yes"] + c["train_no"] == 0],
            "flag_dev_metrics": flag_metrics(flag_logprobs, trainer.dev_examples, trainer.flag_names, temperatures)}


@dataclass
class LexicalPart:
    """The stack's lexical side, ready before training: the text baseline fitted on train and the lexical
    inputs of every dev pair (rows of ``dev_index``)."""

    model: Any
    dev_inputs: np.ndarray
    dev_index: dict[str, int]
    seconds: float
    train_pairs: int | None = None  # pairs the baseline was fitted on here (None: passed in fitted)
    flag_words: dict[str, Any] = field(default_factory=dict)  # flag -> title-words model fitted on train (or None)
    dev_cosine: np.ndarray | None = None  # the retriever's cosine of every dev pair (rows of ``dev_index``)
    retriever: str | None = None  # that retriever's name
    cosine_seconds: float = 0.0


def _lexical_part(train: pd.DataFrame, dev: pd.DataFrame, policy: Policy, args: FinetuneArgs, clock: Clock,
                  fitted: Any = None, cosine: RetrieverCosine | None = None) -> LexicalPart | None:
    from annotator.stack import fit_flag_words, lexical_inputs

    if not args.stack:
        return None
    tick = time.monotonic()
    labels = policy.scheme.label_names
    model, n_fit = (fitted, None) if fitted is not None else _fit_lexical_in_budget(train, policy, args, clock)
    inputs = lexical_inputs(model, dev, len(labels))
    flag_words = {name: fit_flag_words(*_flag_decisions(train, name)) for name in policy.flag_names}
    seconds, tick = time.monotonic() - tick, time.monotonic()
    dev_cosine = cosine(dev) if cosine is not None else None
    return LexicalPart(model, inputs, {pid: i for i, pid in enumerate(dev["pair_id"])}, seconds, n_fit, flag_words,
                       dev_cosine, cosine.name if cosine is not None else None, round(time.monotonic() - tick, 2))


LEXICAL_PROBE_PAIRS = 2000  # a first fit of the text baseline on this many pairs measures its pace


def _fit_lexical_in_budget(train: pd.DataFrame, policy: Policy, args: FinetuneArgs, clock: Clock) -> tuple[Any, int]:
    """The text baseline fitted on every train pair, or, under a budget, on as many (drawn at random) as
    ``lexical_share`` of it allows at the pace of a first fit on `LEXICAL_PROBE_PAIRS` pairs (it is linear in
    the pairs: on 2 busy cores 3,000 pairs took 47 s and 42,576 took 387 s). Returns it and its pair count."""
    from annotator.stack import fit_lexical

    labels = policy.scheme.label_names

    def fit(frame: pd.DataFrame) -> Any:
        return fit_lexical(frame, np.array([labels.index(policy.scheme.normalize(label)) for label in frame["label"]]))

    if math.isinf(clock.limit_s) or len(train) <= 2 * LEXICAL_PROBE_PAIRS:
        return fit(train), len(train)
    tick = time.monotonic()
    probe = subsample(train, LEXICAL_PROBE_PAIRS, args.seed)
    model = fit(probe)
    seconds_per_pair = (time.monotonic() - tick) / len(probe)
    n_fit = int(min(len(train), max(0.0, args.lexical_share * clock.limit_s - (time.monotonic() - tick))
                    / seconds_per_pair))
    if n_fit < 2 * len(probe):
        return model, len(probe)
    return fit(subsample(train, n_fit, args.seed)), n_fit


def _flag_decisions(frame: pd.DataFrame, flag: str) -> tuple[pd.Series, np.ndarray]:
    """The titles of the pairs of ``frame`` with a decision on ``flag``, and the decisions (True: applies)."""
    if "flags" not in frame.columns:
        return frame["title"].iloc[:0], np.zeros(0, dtype=bool)
    decided = [d.get(flag) if isinstance(d, dict) else None for d in frame["flags"]]
    keep = np.asarray([d is not None for d in decided], dtype=bool)
    return frame["title"][keep], np.asarray([bool(d) for d in decided if d is not None], dtype=bool)


def _fit_stack(trainer: _Trainer, dev: pd.DataFrame, logprobs: Scores, temperature: float,
               flag_temperatures: dict[str, float], lexical: LexicalPart | None) -> dict[str, Any] | None:
    """Fit the stack on the dev scores, save it beside the adapter; its ``meta.json`` record (None: no stack)."""
    from annotator import stack as st

    for name in (st.STACK_FILE, st.STACK_ARRAYS):  # never leave an earlier run's stack beside a new adapter
        (trainer.out_dir / name).unlink(missing_ok=True)
    if lexical is None:
        return None
    targets = trainer.dev_examples.grade_targets
    if len(targets) < st.MIN_DEV_PAIRS or len(np.unique(targets)) < 2:
        return {"fitted": False, "reason": f"{len(targets)} dev pairs of {len(np.unique(targets))} label(s): "
                                           f"a stack needs {st.MIN_DEV_PAIRS} pairs of two labels or more"}
    tick = time.monotonic()
    pair_ids = trainer.dev_examples.grade_pair_ids
    rows = [lexical.dev_index[pid] for pid in pair_ids]
    groups = dev["query_id"].to_numpy()[rows]

    def evaluate(probs: np.ndarray) -> dict[str, Any]:
        return _headline(evaluate_labels(targets, probs, trainer.grades, trainer.dev_ratings,
                                         rating_scale=trainer.rating_scale, label_names=trainer.labels))

    fitted, report = st.fit_with_report(labels=trainer.labels, grades=trainer.grades, lexical=lexical.model,
                                        lexical_dev=lexical.dev_inputs[rows], llm_logprobs=logprobs.grade,
                                        targets=targets, groups=groups, evaluate=evaluate,
                                        adapter_probs=apply_temperature(logprobs.grade, temperature),
                                        cosine=None if lexical.dev_cosine is None else lexical.dev_cosine[rows],
                                        retriever=lexical.retriever)
    flag_report = None
    if trainer.flag_names:
        flag_dev = _flag_dev(trainer, logprobs.flag, pair_ids, flag_temperatures, lexical.flag_words)
        fitted.flags, flag_report = st.fit_flags_with_report(
            labels=trainer.labels, flags=flag_dev, dev_texts=dev.iloc[rows].reset_index(drop=True),
            lexical_dev=lexical.dev_inputs[rows], groups=groups)
    record = fitted.save(trainer.out_dir)
    if not report["llm_adds"]:
        warnings.warn(f"stack: {report['verdict']}", StackWithoutLLMWarning, stacklevel=3)
    return {"fitted": True, **record, "dev_report": report,
            **({"flag_dev_report": flag_report} if flag_report is not None else {}),
            "lexical_fit_seconds": round(lexical.seconds, 1), "lexical_train_pairs": lexical.train_pairs,
            **({"cosine_seconds": lexical.cosine_seconds} if lexical.retriever else {}),
            "fit_seconds": round(time.monotonic() - tick, 2)}


def _flag_dev(trainer: _Trainer, flag_logprobs: np.ndarray, pair_ids: list[str], temperatures: dict[str, float],
              words: dict[str, Any]) -> list[Any]:
    """Per policy flag, its `annotator.stack.FlagDev`: the dev flag scores and decisions by dev pair (``pair_ids``)."""
    from annotator.stack import FlagDev

    examples = trainer.dev_examples
    row_of = {pid: i for i, pid in enumerate(pair_ids)}
    flag_rows = examples.flag_rows
    result = []
    for index, name in enumerate(trainer.flag_names):
        logprobs = np.full((len(pair_ids), 2), np.nan)
        decisions = np.full(len(pair_ids), -1, dtype=int)
        for scored, row in enumerate(flag_rows):
            if examples.flags[row] == index and examples.pair_ids[row] in row_of:
                logprobs[row_of[examples.pair_ids[row]]] = flag_logprobs[scored]
                decisions[row_of[examples.pair_ids[row]]] = int(examples.flag_targets[row] == 0)
        result.append(FlagDev(name, logprobs, decisions, words.get(name), temperatures.get(name, 1.0)))
    return result


class StackWithoutLLMWarning(UserWarning):
    """The full stack is no measurably better on dev than the stack without the LLM's inputs."""


def flags_after_predicted_grade(*, model: Any, tokenizer: Any, policy: Policy, dev: pd.DataFrame,
                                examples: EncodedExamples, scores: Scores, label_ids: Sequence[int],
                                flag_ids: Sequence[int], batch_size: int = 32) -> tuple[np.ndarray, int]:
    """(m, 2) scores of ``examples.flag_rows`` with each flag asked after the pair's *predicted* grade (the
    argmax of ``scores.grade``), as `annotator.labeler.Labeler` asks it when labelling, and how many were
    rescored.

    Training asks a flag after the pair's true grade; calibrating (and stacking) those scores would fit a
    prompt the labeler never sees where the grade is wrong. Rows of pairs whose predicted grade is the true
    one keep ``scores.flag`` (the same prompt); the others go through the whole model again (``dev`` holds
    the pairs' texts and flag decisions).
    """
    labels = policy.scheme.label_names
    pair_ids = examples.grade_pair_ids
    predicted = {pid: labels[int(np.argmax(row))] for pid, row in zip(pair_ids, scores.grade)}
    wrong = {pid for pid, target in zip(pair_ids, examples.grade_targets) if predicted[pid] != labels[target]}
    flag_rows = examples.flag_rows
    wrong &= {examples.pair_ids[row] for row in flag_rows}
    if not wrong:
        return scores.flag, 0
    frame = dev[dev["pair_id"].isin(wrong)].copy()
    frame["label"] = frame["pair_id"].map(predicted)
    again = encode_examples(tokenizer, policy, frame)
    asked = again.take(again.flag_rows)
    fresh = score_examples(model, asked, label_ids, flag_ids, int(tokenizer.pad_token_id), batch_size).flag
    by_key = {(pid, int(flag)): row for pid, flag, row in zip(asked.pair_ids, asked.flags, fresh)}
    served = scores.flag.copy()
    for position, row in enumerate(flag_rows):
        key = (examples.pair_ids[row], int(examples.flags[row]))
        if key in by_key:
            served[position] = by_key[key]
    return served, len(by_key)


def _finish(*, trainer: _Trainer, state: LoopState, policy: Policy, prompt_policy: Policy,
            train: pd.DataFrame, dev: pd.DataFrame, train_examples: EncodedExamples, tokenizer: Any,
            base_model_name: str, lexical: LexicalPart | None = None,
            judged: JudgedSettings | None = None) -> FinetuneResult:
    from peft import set_peft_model_state_dict

    from annotator.pair_form import form_record

    model, args, out_dir, dev_examples = trainer.model, trainer.args, trainer.out_dir, trainer.dev_examples
    if state.best_state is not None:
        set_peft_model_state_dict(model, state.best_state)
    head_report = _fit_answer_head(trainer)
    trainer.clock.phase("answer_head")
    reuse = state.best_logprobs is not None and not head_report.get("used")
    logprobs = state.best_logprobs if reuse else trainer.path.score_dev()
    if trainer.flag_names:
        flag_scores, n_rescored = flags_after_predicted_grade(
            model=model, tokenizer=tokenizer, policy=prompt_policy, dev=dev, examples=dev_examples, scores=logprobs,
            label_ids=trainer.label_ids, flag_ids=trainer.flag_ids, batch_size=args.eval_batch_size)
        logprobs = Scores(logprobs.grade, flag_scores)
    temperature, calibration = calibrate(logprobs.grade, dev_examples.grade_targets)
    metrics = {t: dev_metrics(logprobs.grade, dev_examples.grade_targets, trainer.grades, t, trainer.dev_ratings,
                              trainer.rating_scale, trainer.labels) for t in (1.0, temperature)}
    flag_temperatures, flag_calibration = calibrate_flags(logprobs.flag, dev_examples, trainer.flag_names)
    decision = fit_adapter_decision(apply_temperature(logprobs.grade, temperature), dev_examples.grade_targets,
                                trainer.grades, _dev_queries(dev, dev_examples.grade_pair_ids))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)  # the head is a LoRA: lm_head stays the base's
    stack = _fit_stack(trainer, dev, logprobs, temperature, flag_temperatures, lexical)
    trainer.clock.phase("calibration_stack_and_save")
    elapsed = trainer.clock.elapsed()
    meta = {
        "format": "mine-refine labeler adapter v1",
        "base_model": base_model_name,
        "scheme": policy.scheme.name,
        "labels": trainer.labels,
        "policy": policy.name,
        "policy_hash": policy.version,
        "pair_form": form_record(prompt_policy, args.pair_form, judged=judged is not None, match=args.match_hint,
                                 judged_counts=_judged_counts(judged)),
        "judged": judged.record() if judged is not None else None,
        "data_hash": data_hash(pd.concat([train, dev])),
        "label_token_ids": trainer.label_ids,
        "temperature": temperature,
        "calibration": calibration,
        "decision": decision,
        "training_args": args.record(),
        "n_train": len(train_examples.grade_rows),
        "n_train_available": len(train),
        "n_train_used": trainer.n_train_pairs,
        "n_train_sequences": trainer.n_train,
        "n_dev": len(dev_examples.grade_rows),
        "skipped_pairs": len(train_examples.skipped) + len(dev_examples.skipped),
        "prefix_tokens": len(train_examples.prefix),
        "steps": state.step,
        "epochs": round(state.pairs_seen / max(1, trainer.n_train), 3),
        "pairs_seen": state.pairs_seen,
        "training_path": trainer.path.info,
        "answer_head": head_report,
        "step_seconds": round(state.step_seconds, 3),
        "train_step_wall_seconds": round(state.train_wall_s, 1),
        "train_step_cpu_seconds": round(state.train_cpu_s, 1),
        "stop_reason": state.stop_reason,
        "phase_seconds": trainer.clock.phases,
        "train_seconds": round(elapsed, 1),
        "dev_metrics": _headline(metrics[temperature]),
        "dev_metrics_uncalibrated": _headline(metrics[1.0]),
        "dev_metrics_note": "dev is also used for early stopping and for fitting the temperature, so these are "
                            "optimistic; evaluate on held-out queries with `mnr eval-labeler`",
        **_flags_meta(trainer, train_examples, logprobs.flag, flag_temperatures, flag_calibration),
        **({"flag_dev_prompts": f"asked after the predicted grade, as when labelling: {n_rescored} of "
                                f"{len(dev_examples.flag_rows)} dev flag prompts rescored (the rest predicted "
                                "the true grade)"} if trainer.flag_names else {}),
        "stack": stack,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    split = {"dev_split": args.dev_split,
             "train_query_ids": sorted(set(train["query_id"])), "dev_query_ids": sorted(set(dev["query_id"])),
             "dev_query_texts": sorted(set(dev["query"].astype(str))), "dev_pair_ids": dev_examples.grade_pair_ids}
    (out_dir / SPLIT_FILE).write_text(json.dumps(split), encoding="utf-8")
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / "layer-cache", ignore_errors=True)
    return FinetuneResult(out_dir, meta, state.history)


def fit_adapter_decision(dev_probs: np.ndarray, targets: np.ndarray, grades: Sequence[int],
                         groups: Sequence[Any]) -> dict[str, Any]:
    """How the adapter alone writes its label from (n, K) calibrated dev probabilities: cut-points on the
    expected grade where they beat argmax on dev under cross-fitting (`annotator.decision.decide_by_cutoffs`),
    else argmax. ``meta.json`` keeps it under "decision"; the labeler applies it when no stack decides.
    On a 30-minute Home Depot adapter (judged examples and the match hint) they lifted test QWK from 0.306
    to 0.326."""
    _, cutoffs, report = decide_by_cutoffs(dev_probs, targets, grades, groups)
    if cutoffs is None:
        return {"rule": "argmax", "dev_report": report}
    return {**decision_record(grades, cutoffs), "dev_report": report}


def _dev_queries(dev: pd.DataFrame, pair_ids: Sequence[str]) -> list[str]:
    """The query of each dev pair in ``pair_ids`` (the folds of cross-fitted decisions group by it)."""
    queries = dict(zip(dev["pair_id"].astype(str), dev["query_id"]))
    return [str(queries[str(pid)]) for pid in pair_ids]


HEAD_FIT_S_PER_PAIR = 2e-4  # one L-BFGS fit of the answer head per penalty (576-wide states, 4 labels)


def _answer_states(trainer: _Trainer, which: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(states (n, H), label logits (n, K)) at the grade answer of ``which``'s sequences ``rows``, without head."""
    states, logits = [], []
    head = lm_head_of(trainer.model)
    with torch.no_grad():
        for start in range(0, len(rows), trainer.args.eval_batch_size):
            batch = trainer.path.answer_states(which, rows[start:start + trainer.args.eval_batch_size])
            states.append(batch)
            logits.append(head(batch)[:, trainer.label_ids])
    return torch.cat(states).numpy(), torch.cat(logits).double().numpy()


def _fit_answer_head(trainer: _Trainer) -> dict[str, Any]:
    """Fit the answer head (`annotator.answer_head`) on the train pairs' states under the selected adapter, keep
    it where it beats no head on dev by the selection metric, and write it into the adapter's lm_head LoRA."""
    if not trainer.uses_head:
        return {"used": False, "reason": "answer_head off, the full path (no layer cache), or a LoRA rank below "
                                         f"the {len(trainer.label_ids)} labels"}
    model, args = trainer.model, trainer.args
    grade = trainer.targets.grade.numpy().copy()
    grade_at = np.flatnonzero(grade)
    if args.head_train_pairs is not None and len(grade_at) > args.head_train_pairs:
        grade[:] = False
        grade[np.random.default_rng(args.seed + 2).choice(grade_at, args.head_train_pairs, replace=False)] = True
    train_rows = trainer.path.train_index[np.flatnonzero(grade)]
    dev_rows = trainer.dev_examples.grade_rows
    tick = time.monotonic()
    was_training = model.training
    model.eval()
    write_head(model, None, trainer.label_ids)
    train_states, train_logits = _answer_states(trainer, "train", train_rows)
    dev_states, dev_logits = _answer_states(trainer, "dev", dev_rows)
    dev_targets = trainer.dev_examples.grade_targets

    ratings = trainer.dev_ratings

    def score(logprobs: np.ndarray, rows: np.ndarray) -> float:
        return dev_metrics(logprobs, dev_targets[rows], trainer.grades, 1.0,
                           None if ratings is None else ratings[rows], trainer.rating_scale,
                           trainer.labels)[args.select_metric]

    train = (train_states, train_logits, trainer.targets.classes.numpy()[grade], trainer.targets.weights.numpy()[grade])
    head, report = choose_head(train, (dev_states, dev_logits), args.head_penalties, score,
                               lambda value, best: _better(args.select_metric, value, best), seed=args.seed)
    write_head(model, head, trainer.label_ids)
    model.train(was_training)
    return {**report, "metric": args.select_metric, "seconds": round(time.monotonic() - tick, 1)}


HEADLINE_KEYS = ("n", "accuracy", "macro_f1", "kappa", "qwk", "within_one_accuracy", "rmse_grade", "rmse_rating",
                 "log_loss", "ece")


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}


def _check_split(train: pd.DataFrame, dev: pd.DataFrame, by: str = "query") -> None:
    if train.empty or dev.empty:
        raise FinetuneError(f"need both train and dev pairs (got {len(train)} train, {len(dev)} dev)")
    if by not in DEV_SPLITS:
        raise FinetuneError(f"unknown dev split '{by}' (use {' or '.join(DEV_SPLITS)})")
    column = "query_id" if by == "query" else "pair_id"
    shared = set(train[column]) & set(dev[column])
    if shared:
        what = "queries" if by == "query" else "pairs"
        raise FinetuneError(f"{len(shared)} {what} are in both train and dev (e.g. {sorted(shared)[0]}); "
                            f"split by {by}")


def _ratings_for(frame: pd.DataFrame, pair_ids: list[str]) -> np.ndarray | None:
    if "raw_rating" not in frame.columns:
        return None
    lookup = dict(zip(frame["pair_id"], frame["raw_rating"]))
    return np.array([lookup.get(p, np.nan) for p in pair_ids], dtype=float)


def _append_history(out_dir: Path, record: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / HISTORY_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _save_checkpoint(path: Path, *, model: Any, optimizer: Any, scheduler: Any, state: LoopState,
                     elapsed_s: float) -> None:
    """Write the checkpoint beside, then swap it in, so a crash never leaves half of one."""
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging / "adapter"), save_embedding_layers=False)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "elapsed_s": elapsed_s,
                **{name: getattr(state, name) for name in CHECKPOINTED}}, staging / "state.pt")
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
