"""The calibrated stack: a multinomial logistic regression over the labeler's scores and lexical match features.

The LLM labeler reads a prompt; the text baseline (`annotator.text_baseline`) reads words. The stack
combines them, per pair, from these input groups (`INPUTS`):

- ``llm``: the labeler's label log-probabilities, renormalised over the labels (K columns);
- ``lexical``: the query-title match scores of `QueryTitleFeatures` (word and character
  TF-IDF cosine, share of query words in the title) and the log class probabilities of the text
  baseline fitted on the *train* pairs, so they are out of sample on dev (3 + K columns);
- ``cosine``: the retriever's query-title cosine (1 column), when the caller gives one (`RetrieverCosine`:
  ``mnr finetune --retriever``). The stack records the retriever's name; a labeler applying it must be given
  the same retriever (the app loads it: annotator never imports trainer).

The regression (standardised inputs, L2) is fitted on the dev pairs that fine-tuning scores; its
held-out quality is measured by cross-validation on dev, grouped by query (`cross_validate`), with
and without the ``llm`` inputs, so the report says whether the LLM adds anything measurable.

The label a stack writes (`Stack.choose_labels`) is the most probable one, or, when cut-points on the
expected grade beat argmax's dev QWK under cross-fitting, the one those cut-points give (`decide_by_cutoffs`,
`annotator.decision`): on a graded scale a calibrated model rarely makes a middle grade the most probable.

Policy flags are calibrated too (`FlagModel`, `Stack.predict_flags`): per flag a binary logistic regression on
the dev pairs with a decision over the LLM's flag log-odds (lp_yes - lp_no), the lexical inputs above and the
log-odds of a bag of title words fitted on the train decisions (`fit_flag_words`; a word-list rule lives in the
title's words), reported with and without the LLM input (`fit_flags_with_report`). A flag with too few dev
decisions keeps the adapter's temperature.

`Stack.save` writes ``stack.json`` (parameters, version) and ``stack.npz`` (arrays, loaded without
pickle) into the adapter folder; the version is a hash of that content, checked on `load_stack`.
`annotator.labeler.Labeler` applies a saved stack after any backend's scoring.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy.special import log_softmax
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, precision_recall_fscore_support
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from annotator.decision import DecisionError, choose_labels, decide_by_cutoffs, decision_record, read_decision
from annotator.sklearn_state import (
    content_hash,
    logistic_from_state,
    logistic_state,
    prefixed,
    scaler_from_state,
    scaler_state,
    tfidf_from_state,
    tfidf_state,
    unprefixed,
)
from annotator.text_baseline import (
    MATCH_FEATURE_SCALE,
    MATCH_FEATURES,
    baseline_from_state,
    baseline_state,
    class_probs,
    tfidf_linear_model,
)
from labelstore.errors import MnrError

STACK_FILE = "stack.json"
STACK_ARRAYS = "stack.npz"
STACK_FORMAT = "mine-refine stack v1"
INPUTS = ("llm", "lexical", "cosine")
LOG_FLOOR = -20.0  # log-probabilities below this (or -inf: a label an engine did not return) are clipped
STACK_C = 0.3
CV_FOLDS = 5
MIN_DEV_PAIRS = 20  # fewer dev pairs (or one class) fit no stack
MIN_FLAG_ANSWERS = 3  # a flag's regression needs this many dev decisions of each answer (yes and no)
FLAG_INPUTS = ("llm", "lexical")
FLAG_LEXICAL_NAMES = ("title_words_logodds",)


class StackError(MnrError):
    """A stack cannot be fitted, loaded or applied with these inputs."""


@dataclass(frozen=True)
class RetrieverCosine:
    """The retriever's cosine as a stack input: ``name`` (what the stack records: a registry model id, or
    ``zero-shot``) and ``score`` (a frame with columns query, title -> (n,) query-title cosines)."""

    name: str
    score: Callable[[pd.DataFrame], np.ndarray]

    def __call__(self, frame: pd.DataFrame) -> np.ndarray:
        if len(frame) == 0:
            return np.zeros(0)
        cosines = np.asarray(self.score(frame[["query", "title"]]), dtype=np.float64).reshape(-1)
        if len(cosines) != len(frame):
            raise StackError(f"retriever {self.name}: {len(cosines)} cosines for {len(frame)} pairs")
        return cosines


def fit_lexical(train: pd.DataFrame, targets: np.ndarray) -> Pipeline:
    """The text baseline (`tfidf_linear_model`) fitted on ``train`` (columns query, title) and class indices ``targets``."""
    return tfidf_linear_model().fit(train[["query", "title"]], targets)


def lexical_inputs(lexical: Pipeline, frame: pd.DataFrame, n_classes: int) -> np.ndarray:
    """(n, 3 + K) match scores and the baseline's log class probabilities of ``frame`` (columns query, title)."""
    features = lexical[0].transform(frame[["query", "title"]])  # once: the baseline and the match scores share it
    log_probs = np.log(np.clip(class_probs(lexical[-1], features, n_classes), np.exp(LOG_FLOOR), 1.0))
    matches = features[:, -len(MATCH_FEATURES):].toarray() / MATCH_FEATURE_SCALE
    return np.column_stack([matches, log_probs])


def llm_inputs(logprobs: np.ndarray) -> np.ndarray:
    """(n, K) label log-probabilities renormalised over the labels (a per-row constant cancels), clipped."""
    scores = np.maximum(np.asarray(logprobs, dtype=np.float64), LOG_FLOOR)
    return np.maximum(log_softmax(scores, axis=1), LOG_FLOOR)


def input_names(inputs: Sequence[str], labels: Sequence[str]) -> list[str]:
    names = {"llm": [f"llm_logprob_{label}" for label in labels],
             "lexical": [*MATCH_FEATURES, *(f"baseline_logprob_{label}" for label in labels)],
             "cosine": ["retriever_cosine"]}
    return [name for group in inputs for name in names[group]]


def design(inputs: Sequence[str], *, llm: np.ndarray | None = None, lexical: np.ndarray | None = None,
           cosine: np.ndarray | None = None) -> np.ndarray:
    """The stack's input matrix: the ``inputs`` groups side by side, in `INPUTS` order."""
    given = {"llm": llm, "lexical": lexical, "cosine": None if cosine is None else np.asarray(cosine).reshape(-1, 1)}
    unknown = [group for group in inputs if group not in INPUTS]
    if unknown:
        raise StackError(f"unknown stack input(s) {', '.join(unknown)} (use {', '.join(INPUTS)})")
    missing = [group for group in inputs if given[group] is None]
    if missing:
        hint = " (the stack was fitted with the retriever's cosine: pass it)" if "cosine" in missing else ""
        raise StackError(f"the stack needs input(s) {', '.join(missing)}{hint}")
    return np.column_stack([given[group] for group in INPUTS if group in inputs]).astype(np.float64)


def stack_model() -> Pipeline:
    """Standardised inputs, then a multinomial logistic regression with a firm L2 penalty (`STACK_C`): dev sets
    are small (an inner search of C cost seconds per fit on this CPU, more than the whole stack is worth)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=STACK_C, max_iter=1000))


@dataclass
class Stack:
    """A fitted stack: ``lexical`` (the text baseline fitted on train) and ``model`` (scaler + regression)."""

    labels: list[str]
    inputs: tuple[str, ...]
    lexical: Pipeline
    model: Pipeline
    flags: list[FlagModel] = field(default_factory=list)  # in the policy's flag order
    grades: list[int] | None = None  # the labels' grades, with ``cutoffs``
    cutoffs: list[float] | None = None  # cut-points on the expected grade (`annotator.decision`); None: argmax
    retriever: str | None = None  # the `RetrieverCosine` name, when ``inputs`` has "cosine"

    @property
    def feature_names(self) -> list[str]:
        return input_names(self.inputs, self.labels)

    @property
    def flag_names(self) -> list[str]:
        return [flag.name for flag in self.flags]

    @property
    def version(self) -> str:
        """The hash of the stack's content; computed each time, since a fitted stack's decision is set after it."""
        params, arrays = self.state()
        return content_hash(params, arrays)

    @property
    def uses_llm(self) -> bool:
        return "llm" in self.inputs

    @property
    def uses_cosine(self) -> bool:
        return "cosine" in self.inputs

    def check_retriever(self, retriever: RetrieverCosine | None) -> None:
        """`StackError` when the stack reads a retriever's cosine and ``retriever`` is missing or another one."""
        if not self.uses_cosine or (retriever is not None and retriever.name == self.retriever):
            return
        given = f", not {retriever.name}'s" if retriever is not None else ""
        raise StackError(f"the stack was fitted with retriever {self.retriever}'s cosine{given}: pass that retriever "
                         f"(a RetrieverCosine named {self.retriever}; app.retriever_cosine builds it), or label "
                         "without the stack (use_stack=False, mnr label --no-stack)")

    def cosines(self, frame: pd.DataFrame, retriever: RetrieverCosine | None) -> np.ndarray | None:
        """(n,) the ``retriever``'s cosines of ``frame``'s pairs when the stack reads them (None when it does not);
        `StackError` when it does and ``retriever`` is missing or not the one it was fitted with."""
        self.check_retriever(retriever)
        return retriever(frame) if self.uses_cosine and retriever is not None else None

    @property
    def flags_use_llm(self) -> bool:
        """Whether any flag needs the LLM's flag log-probabilities (an LLM input, or a temperature alone)."""
        return any(flag.model is None or "llm" in flag.inputs for flag in self.flags)

    def predict_proba(self, frame: pd.DataFrame, llm_logprobs: np.ndarray | None = None,
                      retriever: RetrieverCosine | None = None) -> np.ndarray:
        """(n, K) label probabilities of the pairs of ``frame`` (columns query, title), scheme order;
        ``retriever`` gives the cosine of a stack fitted with one (`cosines`)."""
        if len(frame) == 0:
            return np.zeros((0, len(self.labels)))
        lexical = lexical_inputs(self.lexical, frame, len(self.labels)) if "lexical" in self.inputs else None
        llm = llm_inputs(llm_logprobs) if llm_logprobs is not None else None
        matrix = design(self.inputs, llm=llm, lexical=lexical, cosine=self.cosines(frame, retriever))
        return class_probs(self.model, matrix, len(self.labels))

    def choose_labels(self, probs: np.ndarray) -> np.ndarray:
        """(n,) the label indices the stack writes for (n, K) ``probs`` (its `predict_proba`): by its
        cut-points on the expected grade when it has them, else the most probable label."""
        return choose_labels(probs, self.grades or [], self.cutoffs) if self.cutoffs is not None else \
            np.asarray(probs).argmax(axis=1)

    def predict_flags(self, texts: pd.DataFrame, flag_logprobs: np.ndarray | None) -> np.ndarray:
        """(n, n_flags) P(flag applies) of the pairs of ``texts`` (columns query, title), flags in `flag_names`
        order; ``flag_logprobs`` (n, n_flags, 2) the LLM's FLAG_OPTIONS log-probabilities (None: a stack whose
        flags all do without the LLM)."""
        n = len(texts)
        if flag_logprobs is not None and np.shape(flag_logprobs) != (n, len(self.flags), 2):
            raise StackError(f"flag log-probabilities of shape {np.shape(flag_logprobs)}; the stack's flags "
                             f"({', '.join(self.flag_names) or 'none'}) need ({n}, {len(self.flags)}, 2)")
        if n == 0 or not self.flags:
            return np.zeros((n, len(self.flags)))
        lexical = lexical_inputs(self.lexical, texts, len(self.labels))
        columns = [flag.predict(texts, lexical, None if flag_logprobs is None else flag_llm_inputs(flag_logprobs[:, j]))
                   for j, flag in enumerate(self.flags)]
        return np.column_stack(columns)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        lexical, lexical_arrays = baseline_state(self.lexical)
        scaler, scaler_arrays = scaler_state(self.model[0])
        linear, linear_arrays = logistic_state(self.model[-1])
        params = {"format": STACK_FORMAT, "labels": list(self.labels), "inputs": list(self.inputs),
                  "features": self.feature_names, "lexical": lexical, "scaler": scaler, "linear": linear}
        if self.uses_cosine:  # a stack without the cosine keeps the content (and version) it had before
            params["retriever"] = self.retriever
        arrays = {**prefixed("lexical", lexical_arrays), **prefixed("scaler", scaler_arrays),
                  **prefixed("linear", linear_arrays)}
        if self.cutoffs is not None:  # a stack deciding by argmax keeps the content (and version) it had before
            params["decision"] = decision_record(self.grades or [], self.cutoffs)
        if self.flags:  # a stack without flags keeps the content (and version) it had before flags existed
            params["flags"] = []
            for flag in self.flags:
                flag_params, flag_arrays = flag.state()
                params["flags"].append({**flag_params, "features": flag.feature_names(self.labels)})
                arrays.update(prefixed(f"flag.{flag.name}", flag_arrays))
        return params, arrays

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write ``stack.json`` and ``stack.npz`` into ``folder``; returns the record for ``meta.json``."""
        params, arrays = self.state()
        version = content_hash(params, arrays)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / STACK_ARRAYS, **arrays)
        (folder / STACK_FILE).write_text(json.dumps({**params, "version": version}, indent=1), encoding="utf-8")
        return {"version": version, "inputs": list(self.inputs), "features": self.feature_names,
                "flags": self.flag_names, "files": [STACK_FILE, STACK_ARRAYS],
                **({"retriever": self.retriever} if self.uses_cosine else {})}


def has_stack(folder: str | Path) -> bool:
    return (Path(folder) / STACK_FILE).is_file()


def stack_version(folder: str | Path) -> str | None:
    """The version recorded in ``folder``'s ``stack.json`` (not checked), or None when it has no stack."""
    if not has_stack(folder):
        return None
    return str(_read_params(Path(folder))["version"])


def stack_retriever(folder: str | Path) -> str | None:
    """The retriever whose cosine ``folder``'s stack reads (None: no stack, or one without the cosine)."""
    if not has_stack(folder):
        return None
    params = _read_params(Path(folder))
    if "cosine" not in params.get("inputs", ()):
        return None
    if not params.get("retriever"):
        raise StackError(f"{Path(folder) / STACK_FILE}: the stack reads a retriever's cosine but names no retriever; "
                         "refit it with `mnr finetune --retriever`")
    return str(params["retriever"])


def load_stack(folder: str | Path) -> Stack | None:
    """The stack saved in ``folder``, or None when it has none; `StackError` when it is damaged."""
    folder = Path(folder)
    if not has_stack(folder):
        return None
    params = _read_params(folder)
    if params.get("format") != STACK_FORMAT:
        raise StackError(f"{folder / STACK_FILE}: format {params.get('format')!r}, expected {STACK_FORMAT!r}")
    try:
        with np.load(folder / STACK_ARRAYS, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError) as exc:
        raise StackError(f"{folder / STACK_ARRAYS}: cannot read the stack's arrays ({exc})") from exc
    stack = Stack(labels=list(params["labels"]), inputs=tuple(params["inputs"]),
                  lexical=baseline_from_state(params["lexical"], unprefixed("lexical", arrays)),
                  model=Pipeline([("standardscaler", scaler_from_state(params["scaler"], unprefixed("scaler", arrays))),
                                  ("logisticregression", logistic_from_state(params["linear"],
                                                                             unprefixed("linear", arrays)))]),
                  flags=[flag_from_state(flag, unprefixed(f"flag.{flag['name']}", arrays))
                         for flag in params.get("flags", [])],
                  retriever=params.get("retriever"),
                  **_decision_from_params(params.get("decision"), folder, len(params["labels"])))
    if stack.version != params["version"]:
        raise StackError(f"{folder}: the stack's content does not match its version {params['version']} "
                         f"(now {stack.version}); refit it with `mnr finetune`")
    return stack


def _decision_from_params(decision: dict[str, Any] | None, folder: Path, n_labels: int) -> dict[str, Any]:
    try:
        read = read_decision(decision, n_labels)
    except DecisionError as exc:
        raise StackError(f"{folder / STACK_FILE}, field 'decision': {exc}") from exc
    return {} if read is None else {"grades": read[0], "cutoffs": read[1]}


def _read_params(folder: Path) -> dict[str, Any]:
    path = folder / STACK_FILE
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StackError(f"{path}: not valid JSON ({exc})") from exc
    if "version" not in params:
        raise StackError(f"{path}: no 'version' field")
    return params


# -- fitting and its honest dev quality ---------------------------------------------------------------
def fit_stack(labels: Sequence[str], inputs: Sequence[str], lexical: Pipeline, matrix: np.ndarray,
              targets: np.ndarray, retriever: str | None = None) -> Stack:
    """A stack over the ``inputs`` groups, fitted on ``matrix`` (`design` of the dev pairs) and class indices
    ``targets``; ``retriever`` names the cosine's retriever when ``inputs`` has "cosine"."""
    if ("cosine" in inputs) != (retriever is not None):
        raise StackError("a stack reads the retriever's cosine exactly when it is told the retriever's name")
    model = stack_model().fit(matrix, targets)
    return Stack(labels=list(labels), inputs=tuple(inputs), lexical=lexical, model=model, retriever=retriever)


def cross_validate(matrix: np.ndarray, targets: np.ndarray, groups: Sequence[Any], n_classes: int,
                   folds: int = CV_FOLDS, *, stratified: bool = False) -> np.ndarray:
    """(n, K) out-of-fold probabilities of `stack_model` on ``matrix``, folds grouped by query (``groups``)
    when there are enough queries, else at random; ``stratified`` keeps each class's share in every fold
    (a rare flag's few positives spread over the folds)."""
    groups = np.asarray(groups)
    if stratified:
        folds = max(2, min(folds, int(np.bincount(targets).min())))
    if len(np.unique(groups)) >= folds:
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=0) if stratified else GroupKFold(folds)
        splits = splitter.split(matrix, targets, groups)
    elif stratified:
        splits = StratifiedKFold(folds, shuffle=True, random_state=0).split(matrix, targets)
    else:
        splits = KFold(n_splits=min(folds, len(targets)), shuffle=True, random_state=0).split(matrix)
    probs = np.zeros((len(targets), n_classes))
    for train_index, test_index in splits:
        if len(np.unique(targets[train_index])) < 2:  # nothing to learn: the fold's prior
            probs[test_index] = np.bincount(targets[train_index], minlength=n_classes) / len(train_index)
            continue
        probs[test_index] = class_probs(stack_model().fit(matrix[train_index], targets[train_index]),
                                        matrix[test_index], n_classes)
    return probs


def llm_contribution(full: np.ndarray, lexical: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Does the LLM add something measurable? The paired per-pair log-loss gain of the full stack over the
    lexical-only stack (out-of-fold probabilities), with its standard error: measurable when the mean gain
    exceeds two standard errors."""
    rows = np.arange(len(targets))
    gain = np.log(np.clip(full[rows, targets], 1e-12, 1)) - np.log(np.clip(lexical[rows, targets], 1e-12, 1))
    mean = float(gain.mean()) if len(gain) else 0.0
    se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("inf")
    adds = bool(mean > 2 * se)
    verdict = (f"the LLM adds {mean:.4f} nats/pair of dev log-likelihood (+/- {se:.4f} s.e.): measurable" if adds else
               f"the LLM adds nothing measurable: {mean:+.4f} nats/pair of dev log-likelihood (+/- {se:.4f} s.e.)")
    return {"llm_adds": adds, "log_likelihood_gain_per_pair": round(mean, 5), "standard_error": round(se, 5),
            "verdict": verdict}


def fit_with_report(*, labels: Sequence[str], grades: Sequence[int], lexical: Pipeline, lexical_dev: np.ndarray,
                    llm_logprobs: np.ndarray, targets: np.ndarray, groups: Sequence[Any],
                    evaluate: Callable[[np.ndarray], dict[str, Any]], adapter_probs: np.ndarray,
                    cosine: np.ndarray | None = None, retriever: str | None = None) -> tuple[Stack, dict[str, Any]]:
    """The full stack fitted on all dev pairs, and the dev report: ``evaluate`` (probabilities -> metrics) of
    the adapter alone (``adapter_probs``), and of the lexical-only and the full stack out of fold
    (`cross_validate`), with `llm_contribution`; and the stack's decision (`decide_by_cutoffs`). ``cosine``
    (n_dev,): the cosines of the retriever named ``retriever``, an input of both stacks."""
    n_classes = len(labels)
    extra = ("cosine",) if cosine is not None else ()
    full_inputs, lexical_inputs_ = ("llm", "lexical", *extra), ("lexical", *extra)
    full = design(full_inputs, llm=llm_inputs(llm_logprobs), lexical=lexical_dev, cosine=cosine)
    lexical_only = design(lexical_inputs_, lexical=lexical_dev, cosine=cosine)
    stack, full_oof, decision = fit_deciding_stack(labels, grades, full_inputs, lexical, full, targets, groups,
                                                   retriever=retriever)
    lexical_oof = cross_validate(lexical_only, targets, groups, n_classes)
    report = {"method": f"{CV_FOLDS}-fold cross-validation on dev, grouped by query; the adapter alone is scored "
                        "on the same dev pairs, which also selected it and fitted its temperature (optimistic)",
              "n_dev": int(len(targets)), "adapter": evaluate(adapter_probs), "lexical_only": evaluate(lexical_oof),
              "full": evaluate(full_oof), **llm_contribution(full_oof, lexical_oof, targets), "decision": decision,
              "retriever": retriever}
    return stack, report


def fit_deciding_stack(labels: Sequence[str], grades: Sequence[int], inputs: Sequence[str], lexical: Pipeline,
                       matrix: np.ndarray, targets: np.ndarray, groups: Sequence[Any],
                       retriever: str | None = None) -> tuple[Stack, np.ndarray, dict[str, Any]]:
    """(stack, its (n, K) out-of-fold dev probabilities, its decision report): `fit_stack` over the ``inputs``
    groups on ``matrix``, writing labels by cut-points when they beat argmax on the out-of-fold probabilities
    (`decide_by_cutoffs`)."""
    oof = cross_validate(matrix, targets, groups, len(labels))
    stack = fit_stack(labels, inputs, lexical, matrix, targets, retriever)
    stack.grades, stack.cutoffs, decision = decide_by_cutoffs(oof, targets, grades, groups)
    return stack, oof, decision


# -- flags ------------------------------------------------------------------------------------------
def fit_flag_words(titles: pd.Series, applies: np.ndarray) -> Pipeline | None:
    """A flag's bag of title words: TF-IDF of title words and word pairs + logistic regression, fitted on the
    *train* decisions ``applies`` (bool), so its log-odds are out of sample on dev. None without both answers.

    A word-list rule (pesticides, firearms) lives in the title's words, which the query-title match features
    do not see.
    """
    applies = np.asarray(applies, dtype=bool)
    if applies.all() or not applies.any():
        return None
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    return make_pipeline(vectorizer, LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000)).fit(
        _titles(titles), applies.astype(int))


def flag_word_logodds(words: Pipeline | None, frame: pd.DataFrame) -> np.ndarray:
    """(n,) the title-words model's log-odds that the flag applies (0 when there is no model)."""
    if words is None or len(frame) == 0:
        return np.zeros(len(frame))
    return np.asarray(words.decision_function(_titles(frame["title"])), dtype=np.float64)


def _titles(titles: pd.Series) -> pd.Series:
    return titles.fillna("").astype(str)


def flag_llm_inputs(flag_logprobs: np.ndarray) -> np.ndarray:
    """(n, 1) the LLM's log-odds lp_yes - lp_no of one flag's (n, 2) FLAG_OPTIONS log-probabilities, clipped."""
    scores = np.maximum(np.asarray(flag_logprobs, dtype=np.float64), LOG_FLOOR)
    return (scores[:, 0] - scores[:, 1]).reshape(-1, 1)


@dataclass
class FlagModel:
    """One flag's calibration: a binary logistic regression (``model``: scaler + regression, class 1 = the flag
    applies) over ``inputs`` (`FLAG_INPUTS`: the LLM's flag log-odds; the grade stack's lexical inputs and the
    title-words log-odds of ``words``). ``model`` None: no regression was fitted (too few dev decisions), and
    P = sigmoid(log-odds / ``temperature``), the adapter's calibration."""

    name: str
    inputs: tuple[str, ...]
    words: Pipeline | None
    model: Pipeline | None
    temperature: float = 1.0

    def feature_names(self, labels: Sequence[str]) -> list[str]:
        names = {"llm": ["llm_flag_logodds"], "lexical": [*input_names(("lexical",), labels), *FLAG_LEXICAL_NAMES]}
        return [name for group in self.inputs for name in names[group]]

    def design(self, *, llm: np.ndarray | None, lexical: np.ndarray | None, words: np.ndarray | None) -> np.ndarray:
        given = {"llm": llm, "lexical": None if lexical is None else np.column_stack([lexical, words])}
        missing = [group for group in self.inputs if given[group] is None]
        if missing:
            raise StackError(f"flag '{self.name}': the stack needs input(s) {', '.join(missing)}")
        return np.column_stack([given[group] for group in FLAG_INPUTS if group in self.inputs]).astype(np.float64)

    def predict(self, frame: pd.DataFrame, lexical: np.ndarray | None, llm: np.ndarray | None) -> np.ndarray:
        """(n,) P(flag applies); ``lexical`` the grade stack's lexical inputs of ``frame``, ``llm`` `flag_llm_inputs`."""
        if self.model is None:
            if llm is None:
                raise StackError(f"flag '{self.name}' is calibrated by temperature alone: pass its log-probabilities")
            return 1.0 / (1.0 + np.exp(-llm[:, 0] / self.temperature))
        matrix = self.design(llm=llm, lexical=lexical, words=flag_word_logodds(self.words, frame))
        return class_probs(self.model, matrix, 2)[:, 1]

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params: dict[str, Any] = {"name": self.name, "inputs": list(self.inputs), "temperature": self.temperature,
                                  "words": None, "scaler": None, "linear": None}
        arrays: dict[str, np.ndarray] = {}
        if self.words is not None:
            tfidf, tfidf_arrays = tfidf_state(self.words[0])
            linear, linear_arrays = logistic_state(self.words[-1])
            params["words"] = {"tfidf": tfidf, "linear": linear}
            arrays.update({**prefixed("words.tfidf", tfidf_arrays), **prefixed("words.linear", linear_arrays)})
        if self.model is not None:
            params["scaler"], scaler_arrays = scaler_state(self.model[0])
            params["linear"], linear_arrays = logistic_state(self.model[-1])
            arrays.update({**prefixed("scaler", scaler_arrays), **prefixed("linear", linear_arrays)})
        return params, arrays


def flag_from_state(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> FlagModel:
    words = None
    if params.get("words"):
        words = make_pipeline(tfidf_from_state(params["words"]["tfidf"], unprefixed("words.tfidf", arrays)),
                              logistic_from_state(params["words"]["linear"], unprefixed("words.linear", arrays)))
    model = None
    if params.get("linear"):
        model = Pipeline([("standardscaler", scaler_from_state(params["scaler"], unprefixed("scaler", arrays))),
                          ("logisticregression", logistic_from_state(params["linear"], unprefixed("linear", arrays)))])
    return FlagModel(str(params["name"]), tuple(params["inputs"]), words, model, float(params.get("temperature", 1.0)))


@dataclass
class FlagDev:
    """A flag's dev data for the stack: per dev pair (rows of the grade stack's dev matrix) the LLM's (n, 2)
    FLAG_OPTIONS log-probabilities (NaN where not scored) and the decision (1: applies, 0: not, -1: none)."""

    name: str
    logprobs: np.ndarray
    decisions: np.ndarray
    words: Pipeline | None  # the title-words model fitted on train (`fit_flag_words`)
    temperature: float = 1.0  # the adapter's calibration, used when no regression can be fitted


def fit_flags_with_report(*, labels: Sequence[str], flags: Sequence[FlagDev], dev_texts: pd.DataFrame,
                          lexical_dev: np.ndarray, groups: Sequence[Any]) -> tuple[list[FlagModel], dict[str, Any]]:
    """Per flag, the regression fitted on the dev pairs with a decision and an LLM score, and its report:
    `flag_report` of the LLM alone (sigmoid of its log-odds at the adapter's temperature), and of the stack
    without and with the LLM input out of fold (`cross_validate`, stratified), with `llm_contribution`."""
    models, report = [], {}
    groups = np.asarray(groups)
    for flag in flags:
        rows = np.flatnonzero((flag.decisions >= 0) & np.isfinite(flag.logprobs).all(axis=1))
        truth = flag.decisions[rows].astype(int)
        counts = np.bincount(truth, minlength=2)
        if counts.min() < MIN_FLAG_ANSWERS:
            why = (f"{counts[1]} yes and {counts[0]} no dev decisions: a flag's regression needs "
                   f"{MIN_FLAG_ANSWERS} of each; P = sigmoid(log-odds / T) with the adapter's T = {flag.temperature:.3g}")
            models.append(FlagModel(flag.name, ("llm",), None, None, flag.temperature))
            report[flag.name] = {"fitted": False, "reason": why, "n_dev": int(len(rows)), "positives": int(counts[1])}
            continue
        words = flag_word_logodds(flag.words, dev_texts.iloc[rows])
        llm = flag_llm_inputs(flag.logprobs[rows])
        full_model = FlagModel(flag.name, FLAG_INPUTS, flag.words, None, flag.temperature)
        lexical_model = FlagModel(flag.name, ("lexical",), flag.words, None, flag.temperature)
        full = full_model.design(llm=llm, lexical=lexical_dev[rows], words=words)
        lexical_only = lexical_model.design(llm=None, lexical=lexical_dev[rows], words=words)
        full_oof = cross_validate(full, truth, groups[rows], 2, stratified=True)
        lexical_oof = cross_validate(lexical_only, truth, groups[rows], 2, stratified=True)
        llm_alone = 1.0 / (1.0 + np.exp(-llm[:, 0] / flag.temperature))
        full_model.model = stack_model().fit(full, truth)
        models.append(full_model)
        report[flag.name] = {"fitted": True, "n_dev": int(len(rows)), "positives": int(counts[1]),
                             "features": full_model.feature_names(labels),
                             "llm_alone": flag_report(truth, llm_alone), "lexical_only": flag_report(truth, lexical_oof[:, 1]),
                             "full": flag_report(truth, full_oof[:, 1]), **llm_contribution(full_oof, lexical_oof, truth)}
    return models, report


def flag_report(truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall, F1 and accuracy at ``threshold``, and the log-loss, of P(flag applies) ``prob``."""
    chosen = (np.asarray(prob) >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(truth, chosen, average="binary", zero_division=0)
    return {"precision": round(float(precision), 4), "recall": round(float(recall), 4), "f1": round(float(f1), 4),
            "accuracy": round(float(np.mean(chosen == truth)), 4),
            "log_loss": round(float(log_loss(truth, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])), 4)}
