"""`Labeler`: policy + model (+ LoRA adapter) -> a probability for every label of every pair.

    labeler = Labeler("smollm2", "esci", backend="vllm", adapter="adapters/esci-lora")
    probs = labeler.score([PairText("cordless drill", "DeWalt 20V drill")])   # shape (1, 4)

Every backend scores one step: the log-probabilities of the label first tokens at the position
right after the prompt (`Policy.render`, tokenized with the tokenizer's defaults). No text is
generated or parsed, so every answer is a valid label. If the adapter folder has a `meta.json`
with a calibration `temperature`, probabilities are softmax(logprobs / temperature); if it records
the adapter's `pair_form`, prompts are rendered in that form.

If the adapter folder holds a calibrated stack (`annotator.stack`, fitted by `mnr finetune`), it is
applied after the backend's scoring, the same for every backend: probabilities are the stack's, from
the label log-probabilities and the pairs' lexical match features (the temperature is then unused).
Its version goes into the author (`...+<adapter>+stack-<version>@<policy>:<version>`); `use_stack=False`
(`mnr label --no-stack`) gives the bare labeler. Without a stack, an adapter whose `meta.json` holds cut-points
on the expected grade (`decision`, fitted on dev) writes its label by them, and their hash goes into the
author (`...+<adapter>+cut-<hash>@...`); the probabilities stay the calibrated ones.

Policy flags (`Policy.flags`) are scored after the grade, one yes/no label-token pass per flag
(`flag_logprobs`, `score_flags`): the flag prompt is the grade prompt, the LLM's most probable grade label
and `Flag <name>:` (`Policy.flag_suffix`), so an engine with prefix caching reuses the grade prompt's
blocks. P(flag) is the stack's (`Stack.predict_flags`) when the stack was fitted with flags, else
sigmoid((logprob yes - logprob no) / T) with T from `meta.json` `flag_temperatures` (default 1).

The policy decides: an adapter whose `meta.json` records the policy it was fine-tuned under
(`policy`, `policy_hash`) only labels under that same policy version. Another policy, or the same
policy with edited text, is a `PolicyMismatchError` unless `allow_policy_mismatch=True`, which
warns (`PolicyMismatchWarning`) and keeps the message in `Labeler.policy_mismatch`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from annotator.backends import BACKENDS
from annotator.backends.base import Backend
from annotator.decision import DecisionError, choose_labels, read_decision
from annotator.judged import JudgedSettings
from annotator.models import resolve_model
from annotator.pair_form import policy_for_adapter
from annotator.prompts import FLAG_OPTIONS, PairText, Policy, load_prompt_policy, remove_steering
from annotator.scoring import flag_probs_from_logprobs, label_token_ids, probs_from_logprobs
from annotator.stack import RetrieverCosine, StackError, load_stack, stack_version
from labelstore.errors import MnrError
from labelstore.ids import file_hash, stable_hash


class AdapterError(MnrError):
    """A LoRA adapter folder is missing or not a PEFT adapter."""


class PolicyMismatchError(MnrError):
    """An adapter fine-tuned under one policy version is asked to label under another."""


class PolicyMismatchWarning(UserWarning):
    """Labelling goes ahead under another policy than the adapter's (allow_policy_mismatch=True)."""


def policy_mismatch(adapter: Path, meta: dict[str, Any], policy: Policy) -> str | None:
    """Why `adapter` (its `meta`) does not fit `policy`, or None when it does or records no policy."""
    trained_hash = meta.get("policy_hash")
    if trained_hash is None or str(trained_hash) == policy.version:
        return None
    trained = f"'{meta.get('policy', '?')}' (hash {trained_hash})"
    wanted = f"'{policy.name}' (hash {policy.version})"
    why = ("the policy text changed after fine-tuning" if meta.get("policy") == policy.name
           else "the adapter's labels would follow the policy it learnt, not this one")
    return f"adapter {adapter} was fine-tuned under policy {trained}, but this labels under policy {wanted}: {why}"


def check_policy(adapter: Path | None, meta: dict[str, Any], policy: Policy, *,
                 allow_mismatch: bool = False) -> str | None:
    """Raise `PolicyMismatchError` when the adapter's policy (from its `meta`) is not `policy`; with
    `allow_mismatch` warn instead and return the message."""
    if adapter is None:
        return None
    message = policy_mismatch(adapter, meta, policy)
    if message is None:
        return None
    if not allow_mismatch:
        raise PolicyMismatchError(f"{message}. Fine-tune an adapter under policy '{policy.name}' "
                                  f"(mnr finetune --policy {policy.name}), label under the adapter's policy, or pass "
                                  "--allow-policy-mismatch to label anyway.")
    warnings.warn(message, PolicyMismatchWarning, stacklevel=3)
    return message


def read_adapter_meta(adapter: str | Path) -> dict[str, Any]:
    """The adapter's `meta.json` (written by fine-tuning), or {} when it has none."""
    path = Path(adapter) / "meta.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter folder that `check_adapter` accepted: passed on, it is not checked again."""

    path: Path


def check_adapter(adapter: str | Path | Adapter) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"adapter {adapter}: no adapter_config.json there; pass a folder written by "
                           "PEFT save_pretrained (e.g. by `mnr finetune`)")
    return Adapter(path.resolve())


def adapter_tag(adapter: Adapter | None) -> str:
    """`<folder name>-<weights hash>` so a retrained adapter of the same name is told apart."""
    if adapter is None:
        return "base"
    weights = sorted(adapter.path.glob("adapter_model.*"))
    digest = file_hash(str(weights[0]))[:8] if weights else "noweights"
    return f"{adapter.path.name}-{digest}"


def make_backend(name: str, model: str, adapter: str | None, **options: Any) -> Backend:
    if name == "vllm":
        from annotator.backends.vllm_backend import VllmBackend

        return VllmBackend(model, adapter, **options)
    if name == "transformers":
        from annotator.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, adapter, **options)
    if name == "openai":
        from annotator.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(model, adapter, **options)
    raise MnrError(f"unknown backend '{name}' (use one of: {', '.join(BACKENDS)})")


def load_backend(model: str, backend: str = "vllm", adapter: str | Adapter | None = None,
                 **backend_options: Any) -> tuple[Backend, str]:
    """The `backend` engine for `model` (a pulled name, HF folder or cached hub id; for `openai` the
    served name) with an optional LoRA `adapter` folder, and its tag `<model>+<adapter>` for authorship."""
    if backend not in BACKENDS:
        raise MnrError(f"unknown backend '{backend}' (use one of: {', '.join(BACKENDS)})")
    checked = check_adapter(adapter) if adapter is not None else None
    engine_model = model if backend == "openai" else resolve_model(model)
    engine = make_backend(backend, engine_model, str(checked.path) if checked else None, **backend_options)
    return engine, model_tag(model, checked)


def model_tag(model: str, adapter: Adapter | None, stack: str | None = None) -> str:
    """`<model>+<adapter tag>[+stack-<stack version> | +cut-<cut-points hash>]`: the model half of a labeler's
    author, known without loading the model. The stack decides the label when there is one, else the adapter's
    cut-points (`adapter_decision`) when it has them."""
    tag = f"{_model_tag(model)}+{adapter_tag(adapter)}"
    if stack:
        return f"{tag}+stack-{stack}"
    decision = adapter_decision(adapter, read_adapter_meta(adapter.path)) if adapter is not None else None
    return f"{tag}+cut-{stable_hash(json.dumps(decision))[:8]}" if decision is not None else tag


def adapter_decision(adapter: Adapter, meta: dict[str, Any]) -> tuple[list[int], list[float]] | None:
    """(grades, cut-points) the adapter alone writes its label by (meta.json "decision", fitted on dev by
    `mnr finetune`), or None: argmax. `AdapterError` naming the file when the record is broken."""
    try:
        return read_decision(meta.get("decision"), len(meta.get("labels") or []))
    except DecisionError as exc:
        raise AdapterError(f"{adapter.path / 'meta.json'}, field 'decision': {exc}") from exc


def adapter_stack_version(adapter: Adapter | None, use_stack: bool = True) -> str | None:
    """The version of the stack a labeler with this adapter applies (None: no stack, or `use_stack` off)."""
    return stack_version(adapter.path) if adapter is not None and use_stack else None


def labeler_author(model_tag: str, policy: Policy) -> str:
    """The `author` of the labels a labeler writes: `<model tag>@<policy>:<policy version>`."""
    return f"{model_tag}@{policy.name}:{policy.version}"


class Labeler:
    """Labels pairs under a policy with one model on one backend.

    Parameters
    ----------
    model : pulled model name (`smollm2`), local HF folder, or cached hub id; for the `openai`
        backend, the name the server serves (`mnr serve` serves the same string you give it).
    policy : policy name in `prompts/policies/` or a loaded `Policy`.
    backend : "vllm", "openai" or "transformers".
    adapter : PEFT LoRA folder (for `openai`: served under its folder name by `mnr serve`).
    allow_policy_mismatch : label with an adapter fine-tuned under another policy version (warns).
    use_stack : apply the adapter folder's calibrated stack when it has one (default); False: the bare labeler.
    retriever : the retriever's cosine (`annotator.stack.RetrieverCosine`), needed when the stack was fitted
        with one (`mnr finetune --retriever`); it must be the same retriever.
    backend_options : passed to the backend (e.g. `endpoints=[...]` for openai, `dtype`, `batch_size`).
    """

    def __init__(self, model: str, policy: str | Policy = "esci", backend: str = "vllm",
                 adapter: str | Adapter | None = None, *, allow_policy_mismatch: bool = False,
                 use_stack: bool = True, retriever: RetrieverCosine | None = None, **backend_options: Any):
        self.policy = policy if isinstance(policy, Policy) else load_prompt_policy(policy)
        self.backend_name = backend
        self.model = model
        checked = check_adapter(adapter) if adapter is not None else None
        self.adapter = str(checked.path) if checked is not None else None
        self.adapter_meta = read_adapter_meta(checked.path) if checked else {}
        self.allow_policy_mismatch = allow_policy_mismatch
        self.policy_mismatch = check_policy(checked.path if checked else None, self.adapter_meta, self.policy,
                                            allow_mismatch=allow_policy_mismatch)
        self.temperature = float(self.adapter_meta.get("temperature", 1.0))
        # the judged examples the adapter was trained with (annotator.judged); callers attach them to pairs
        self.judged = JudgedSettings.from_meta(self.adapter_meta)
        # the adapter learnt one pair form (annotator.pair_form): label with the same prompt
        self.policy = policy_for_adapter(self.policy, self.adapter_meta)
        self.stack = load_stack(checked.path) if checked is not None and use_stack else None
        # the adapter's own cut-points (meta.json "decision"), applied where no stack decides
        self.decision = adapter_decision(checked, self.adapter_meta) if checked is not None else None
        if self.stack is not None:
            self._check_stack_labels()
            try:
                self.stack.check_retriever(retriever)
            except StackError as exc:
                raise AdapterError(f"adapter {self.adapter}: {exc}") from exc
        self.retriever = retriever
        self.backend: Backend
        self.backend, self.model_tag = load_backend(model, backend, checked, **backend_options)
        if self.stack is not None:
            self.model_tag = model_tag(model, checked, self.stack.version)
        self.options = self.policy.answer_options()
        self.token_ids = label_token_ids(self.backend, self.options)
        self.flag_token_ids = flag_token_ids(self.backend, self.policy)
        self.author = labeler_author(self.model_tag, self.policy)

    def with_policy(self, policy: str | Policy) -> "Labeler":
        """A labeler for another policy on the same loaded model and backend (no second engine)."""
        other = object.__new__(Labeler)
        other.__dict__.update(self.__dict__)
        base = policy if isinstance(policy, Policy) else load_prompt_policy(policy)
        other.policy_mismatch = check_policy(Path(self.adapter) if self.adapter else None, self.adapter_meta,
                                             base, allow_mismatch=self.allow_policy_mismatch)
        other.policy = policy_for_adapter(base, self.adapter_meta)
        other.options = other.policy.answer_options()
        other.token_ids = label_token_ids(self.backend, other.options)
        other.flag_token_ids = flag_token_ids(self.backend, other.policy)
        other.author = labeler_author(self.model_tag, other.policy)
        if other.stack is not None:
            other._check_stack_labels()
        return other

    @property
    def label_names(self) -> list[str]:
        return self.policy.scheme.label_names

    def prompts(self, pairs: list[PairText]) -> list[str]:
        return [self.policy.render(pair) for pair in pairs]

    def logprobs(self, pairs: list[PairText]) -> np.ndarray:
        """Label-token logprobs, shape (n_pairs, n_labels), before temperature and normalisation."""
        if not pairs:
            return np.zeros((0, len(self.options)))
        return self.backend.label_logprobs(self.prompts(pairs), self.token_ids, self.options)

    def score(self, pairs: list[PairText]) -> np.ndarray:
        """Label probabilities, shape (n_pairs, n_labels), rows sum to 1, columns in scheme order."""
        return self.probs_of(pairs, self.logprobs(pairs))

    def probs_of(self, pairs: list[PairText], logprobs: np.ndarray) -> np.ndarray:
        """Label probabilities (n_pairs, n_labels) of `pairs` from their label log-probabilities (`logprobs`):
        the stack's when the labeler has one, else softmax(logprobs / temperature)."""
        if self.stack is None:
            return probs_from_logprobs(logprobs, self.temperature)
        return self.stack.predict_proba(self.stack_texts(pairs), logprobs if self.stack.uses_llm else None,
                                        self.retriever)

    @property
    def flag_names(self) -> list[str]:
        return self.policy.flag_names

    def flag_prompts(self, pairs: list[PairText], labels: list[str]) -> list[str]:
        """The flag prompts, pair-major: for each pair (with its grade label), one prompt per flag in policy order."""
        if len(labels) != len(pairs):
            raise ValueError(f"one grade label per pair: {len(pairs)} pairs, {len(labels)} labels")
        return [prompt + self.policy.flag_suffix(label, flag)
                for prompt, label in zip(self.prompts(pairs), labels) for flag in self.flag_names]

    def flag_logprobs(self, pairs: list[PairText], labels: list[str]) -> np.ndarray:
        """Log-probs of the FLAG_OPTIONS first tokens (column 0: yes) after each flag prompt.

        `labels` are the pairs' grade labels (the LLM's most probable ones). Returns shape
        (n_pairs, n_flags, 2), flags in policy order; (n_pairs, 0, 2) without a backend call when
        the policy has no flags.
        """
        n_pairs, n_flags = len(pairs), len(self.flag_names)
        if n_pairs == 0 or n_flags == 0:
            return np.zeros((n_pairs, n_flags, len(FLAG_OPTIONS)))
        scored = self.backend.label_logprobs(self.flag_prompts(pairs, labels), self.flag_token_ids,
                                             list(FLAG_OPTIONS))
        return np.asarray(scored, dtype=np.float64).reshape(n_pairs, n_flags, len(FLAG_OPTIONS))

    def score_flags(self, pairs: list[PairText], labels: list[str]) -> np.ndarray:
        """Calibrated P(flag applies), shape (n_pairs, n_flags), flags in policy order.

        From the stack when it was fitted with flags (`Stack.predict_flags`), else per flag
        sigmoid((logprob yes - logprob no) / T), T from meta.json `flag_temperatures` (default 1.0).
        """
        if not self.flag_names or not pairs:
            return np.zeros((len(pairs), len(self.flag_names)))
        if self._stack_scores_flags():
            stack = self.stack
            assert stack is not None
            logprobs = self.flag_logprobs(pairs, labels) if stack.flags_use_llm else None
            return np.asarray(stack.predict_flags(self.stack_texts(pairs), logprobs), dtype=np.float64)
        return flag_probs_from_logprobs(self.flag_logprobs(pairs, labels), self.flag_temperatures)

    def stack_texts(self, pairs: list[PairText]) -> pd.DataFrame:
        """The stack's input (columns query, title): the text as stored, less any steering request, which the
        prompt drops too (`remove_steering`); otherwise the text the stack was fitted on."""
        words = self.policy.label_words
        return pd.DataFrame({"query": [remove_steering(p.query, words) for p in pairs],
                             "title": [remove_steering(p.title or "", words) for p in pairs]})

    def choose_labels(self, probs: np.ndarray) -> np.ndarray:
        """(n,) the label indices this labeler writes for (n, n_labels) ``probs`` (its `score`): the stack's
        decision (`Stack.choose_labels`) when it has one, else the adapter's cut-points on the expected grade
        (`adapter_decision`) when it has them, else the most probable label."""
        if self.stack is not None:
            return self.stack.choose_labels(probs)
        if self.decision is not None:
            return choose_labels(probs, *self.decision)
        return np.asarray(probs).argmax(axis=1)

    def score_with_flags(self, pairs: list[PairText]) -> tuple[np.ndarray, np.ndarray]:
        """(label probabilities (n_pairs, n_labels), flag probabilities (n_pairs, n_flags)): the flags are
        asked after the LLM's own most probable grade, the prompt fine-tuning calibrated them on
        (`annotator.finetune.flags_after_predicted_grade`); the stack or its cut-points may write another."""
        logprobs = self.logprobs(pairs)
        asked_after = [self.label_names[i] for i in np.asarray(logprobs).argmax(axis=1)] if len(pairs) else []
        return self.probs_of(pairs, logprobs), self.score_flags(pairs, asked_after)

    @property
    def flag_temperatures(self) -> list[float]:
        """The calibration temperature of each flag, policy order (meta.json `flag_temperatures`, default 1.0)."""
        recorded = self.adapter_meta.get("flag_temperatures") or {}
        return [float(recorded.get(name, 1.0)) for name in self.flag_names]

    def _stack_scores_flags(self) -> bool:
        stack_flags = list(getattr(self.stack, "flag_names", None) or [])
        if not stack_flags:
            return False
        if stack_flags != self.flag_names:
            raise AdapterError(f"adapter {self.adapter}: its stack predicts flags {stack_flags}, but policy "
                               f"'{self.policy.name}' declares {self.flag_names}; label with --no-stack or refit it")
        return True

    def _check_stack_labels(self) -> None:
        assert self.stack is not None
        if self.stack.labels != self.label_names:
            raise AdapterError(f"adapter {self.adapter}: its stack predicts labels {self.stack.labels}, but policy "
                               f"'{self.policy.name}' labels {self.label_names}; label with --no-stack or refit it")

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Labeler":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def flag_token_ids(backend: Backend, policy: Policy) -> list[int]:
    """The first tokens of FLAG_OPTIONS when `policy` has flags; [] (no tokenizer call) when it has none."""
    return label_token_ids(backend, list(FLAG_OPTIONS)) if policy.flags else []


def _model_tag(model: str) -> str:
    path = Path(model)
    return path.name if path.is_dir() else model
