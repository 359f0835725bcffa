"""The label batch job behind `mnr label`: select pairs, score them, write labels in chunks.

Resumable: a run freezes its selection (`label_run_items`) when it starts. Each chunk is one
transaction, and every label's `dedup_key` is `<run_id>:<pair_id>`. Started again with the same
selection, policy, model, adapter and backend, the job finds the unfinished run (status not 'ok')
and labels only its pairs that have no label from it yet, so after any crash (even SIGKILL) each
selected pair ends up labelled exactly once for that run.

Policy flags: every label carries the labeler's probability of each of the policy's flags
(`LabelRecord.flags`, scored after the grade: one extra pass per flag); `score_flags=False`
(`mnr label --no-flags`) skips that pass. The run's params record the flags scored (`flags_scored`).

Nothing half-written: the selection is validated whole (every prompt rendered) and the model is
loaded before the run is recorded; a failure later keeps the finished chunks and marks the run
'failed', and the next start resumes it.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from annotator import sql
from annotator.evaluation import labelled_pairs
from annotator.judged import judged_examples
from annotator.labeler import Adapter, Labeler, adapter_stack_version, adapter_tag, check_adapter
from annotator.prompts import EmptyProductTextError, PairText, Policy, load_prompt_policy
from annotator.stack import RetrieverCosine
from labelstore.errors import MnrError
from labelstore.ids import stable_hash
from labelstore.schemes import LabelScheme
from labelstore.store import LabelRecord, Store, new_run_id

SELECTIONS = tuple(sql.SELECTIONS)
DEFAULT_REVIEW_THRESHOLD = 0.6
DEFAULT_CHUNK_SIZE = 64


class SelectionError(MnrError):
    """The selection of pairs to label is invalid (unknown kind, missing query file, ...)."""


@dataclass
class LabelJob:
    """What to label and how. `backend_options` go to the backend (endpoints, dtype, ...).

    Labels with confidence below `review_threshold` are marked for human review; the caller reads it
    from its config (`mnr label`: mnr.toml [annotator]; the loop: its config file)."""

    model: str
    policy: str = "esci"
    select: str = "unlabeled"
    backend: str = "vllm"
    adapter: str | None = None
    limit: int | None = None
    dataset: str | None = None
    query_file: str | None = None
    mining_run: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD
    backend_options: dict[str, Any] = field(default_factory=dict)
    use_stack: bool = True  # apply the adapter's calibrated stack when it has one (`mnr label --no-stack`: off)
    score_flags: bool = True  # score the policy's flags after the grade (`mnr label --no-flags`: off)


@dataclass
class LabelJobResult:
    run_id: str
    resumed: bool
    n_selected: int
    n_labelled_now: int
    label_counts: dict[str, int]
    mean_confidence: float | None
    needs_review: int
    pairs_per_s: float
    author: str
    flagged: dict[str, int] = field(default_factory=dict)  # flag -> the run's labels with P(flag) >= 0.5


def read_query_file(path: str | None) -> list[str]:
    """Normalised queries of a text file: one per line, blank lines and '#' comments skipped."""
    if path is None:
        raise SelectionError("--select query-file needs --query-file PATH (a text file with one query per line)")
    file = Path(path)
    if not file.is_file():
        raise SelectionError(f"query file {file} does not exist")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SelectionError(f"{file}: not UTF-8 text ({exc})") from exc
    queries = [" ".join(line.lower().split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not queries:
        raise SelectionError(f"{file}: no queries in it (one query per line)")
    return queries


def fingerprint(job: LabelJob, policy: Policy, adapter: Adapter | None) -> str:
    """Same selection + policy version + model + adapter weights (+ stack version) + backend -> same fingerprint."""
    queries = read_query_file(job.query_file) if job.select == "query-file" else None
    key = {"select": job.select, "limit": job.limit, "dataset": job.dataset, "queries": queries,
           "mining_run": job.mining_run, "policy": policy.name, "policy_version": policy.version,
           "model": job.model, "adapter": adapter_tag(adapter), "backend": job.backend}
    stack = adapter_stack_version(adapter, job.use_stack)
    if stack:  # only then, so runs without a stack keep the fingerprints they had
        key["stack"] = stack
    if policy.flags and not job.score_flags:  # a run without flags never resumes one with them, nor the reverse
        key["flags"] = False
    return stable_hash(json.dumps(key, sort_keys=True))


def select_pairs(store: Store, job: LabelJob, policy: Policy) -> pd.DataFrame:
    """The pairs `job.select` chooses: columns pair_id, query, title, description, brand."""
    if job.select not in sql.SELECTIONS:
        raise SelectionError(f"unknown selection '{job.select}' (use one of: {', '.join(SELECTIONS)})")
    if job.limit is not None and job.limit < 1:
        raise SelectionError(f"--limit must be at least 1, not {job.limit}")
    params: dict[str, Any] = {"dataset": job.dataset, "limit": job.limit if job.limit is not None else 2**62}
    if job.select == "unlabeled":
        params["scheme"] = policy.scheme.name
    elif job.select == "mined":
        params["mining_run"] = job.mining_run
    elif job.select == "query-file":
        params["queries"] = read_query_file(job.query_file)
    return store.df(sql.SELECTIONS[job.select], params)


def pair_texts(frame: pd.DataFrame) -> list[PairText]:
    def text(value: Any) -> str | None:
        return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)

    return [PairText(query=str(row.query), title=text(row.title) or "", description=text(row.description),
                     brand=text(row.brand), pair_id=str(row.pair_id)) for row in frame.itertuples()]


def with_judged_examples(store: Store, labeler: Labeler, pairs: list[PairText], *,
                         hide: Sequence[str] = ()) -> list[PairText]:
    """``pairs`` with the judged examples their labeler's adapter was trained with (`annotator.judged`), drawn
    from the store's current labels of the adapter's sources (a pair never sees its own); unchanged for an
    adapter without them. ``hide``: pair ids whose labels are not shown (held-out pairs being measured)."""
    settings = labeler.judged
    if settings is None or not pairs:
        return pairs
    pool = labelled_pairs(store, labeler.policy.scheme.name, list(settings.sources))
    return judged_from_pool(labeler, pairs, pool[~pool["pair_id"].isin(set(hide))])


def judged_from_pool(labeler: Labeler, pairs: list[PairText], pool: pd.DataFrame) -> list[PairText]:
    """``pairs`` with their labeler's judged examples drawn from ``pool`` (columns pair_id, query, title, label:
    labels among the labeler's); unchanged for an adapter without them."""
    settings = labeler.judged
    if settings is None or not pairs:
        return pairs
    frame = pd.DataFrame({"pair_id": [p.pair_id for p in pairs], "query": [p.query for p in pairs],
                          "title": [p.title for p in pairs]})
    examples = judged_examples(frame, pool, labeler.label_names, k=settings.k, counts=settings.counts)
    return [replace(pair, judged=judged) for pair, judged in zip(pairs, examples)]


def validate_pairs(policy: Policy, pairs: list[PairText]) -> None:
    """Render every prompt once; raise one error naming every pair without usable text."""
    bad: list[str] = []
    for pair in pairs:
        try:
            policy.pair_part(pair)
        except EmptyProductTextError:
            bad.append(str(pair.pair_id))
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise EmptyProductTextError(f"{len(bad)} selected pair(s) have an empty product title or query: {shown}; "
                                    "nothing was labelled. Fix those products or narrow the selection.")


def label_records(pair_ids: Sequence[str], probs: np.ndarray, *, scheme: LabelScheme, author: str, run_id: str,
                  threshold: float, flag_probs: np.ndarray | None = None,
                  flag_names: Sequence[str] = (), chosen: np.ndarray | None = None) -> list[LabelRecord]:
    """The label rows of a run's scored pairs: label, rounded probabilities, review flag, key `<run>:<pair>`.

    The label is ``chosen`` ((n_pairs,) label indices, the labeler's decision: `Labeler.choose_labels`), or
    the most probable one; its probability is the confidence. `flag_probs` (n_pairs, len(flag_names)), when
    given, become each record's `flags`."""
    names = scheme.label_names
    chosen = np.asarray(probs).argmax(axis=1) if chosen is None else np.asarray(chosen, dtype=int)
    if chosen.shape != (len(pair_ids),) or (len(chosen) and (chosen.min() < 0 or chosen.max() >= len(names))):
        raise ValueError(f"chosen must be {len(pair_ids)} label indices in 0..{len(names) - 1}")
    if flag_probs is not None and np.shape(flag_probs) != (len(pair_ids), len(flag_names)):
        raise ValueError(f"flag_probs must have shape ({len(pair_ids)}, {len(flag_names)}), not {np.shape(flag_probs)}")
    records = []
    for index, (pair_id, row) in enumerate(zip(pair_ids, probs)):
        best = int(chosen[index])
        confidence = float(row[best])
        flags = ({name: round(float(p), 6) for name, p in zip(flag_names, flag_probs[index])}
                 if flag_probs is not None and len(flag_names) else None)
        records.append(LabelRecord(
            pair_id=str(pair_id), scheme=scheme.name, label=names[best], grade=scheme.grade_of(names[best]),
            source="llm", author=author, probs={name: round(float(p), 6) for name, p in zip(names, row)},
            confidence=confidence, run_id=run_id, needs_review=confidence < threshold,
            dedup_key=f"{run_id}:{pair_id}", flags=flags,
        ))
    return records


def scored_flags(job: LabelJob, labeler: Labeler) -> list[str]:
    """The flags a run of `job` scores with `labeler`: the policy's, unless the job turns flags off."""
    return labeler.flag_names if job.score_flags else []


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]labelling"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:.1f} pairs/s"), TimeElapsedColumn(), disable=not enabled)


@dataclass
class RunPlan:
    """A label run about to start or resume: `selection` is empty when resuming (it is frozen already)."""

    run_id: str | None
    resumed: bool
    fingerprint: str
    selection: list[PairText]


def plan_run(store: Store, job: LabelJob, policy: Policy, adapter: Adapter | None, *, run_id: str | None = None,
             new_run: bool = False) -> RunPlan:
    """Find the run to resume (`run_id`, else the unfinished run of the same job unless `new_run`), or select
    and validate the pairs of a new one. Writes nothing."""
    job_fingerprint = fingerprint(job, policy, adapter)
    run_id = run_id or (None if new_run else store.scalar(sql.FIND_RESUMABLE_RUN, {"fingerprint": job_fingerprint}))
    resumed = run_id is not None and bool(store.fetchall(sql.LABEL_RUN_INFO, {"run_id": run_id}))
    if run_id is not None and not resumed:
        raise SelectionError(f"no label run '{run_id}' in {store.path} to resume")
    selection: list[PairText] = []
    if not resumed:
        selection = pair_texts(select_pairs(store, job, policy))
        validate_pairs(policy, selection)
    return RunPlan(run_id=run_id, resumed=resumed, fingerprint=job_fingerprint, selection=selection)


def open_run(store: Store, job: LabelJob, policy: Policy, plan: RunPlan, author: str,
             flags: Sequence[str] = ()) -> str:
    """Mark the planned run running (a new one gets its frozen selection); returns its id.

    `flags` are the flags the run scores; the run's params record them (`flags_scored`)."""
    if not plan.resumed:
        return _start_run(store, job, policy, author, plan.fingerprint, plan.selection, flags)
    assert plan.run_id is not None
    info = store.df(sql.LABEL_RUN_INFO, {"run_id": plan.run_id}).iloc[0]
    if info["author"] != author:
        raise SelectionError(f"run {plan.run_id} was labelled by {info['author']}, not {author}; "
                             "start a new run (--new-run)")
    store.start_run("label", run_id=plan.run_id, params={**asdict(job), "flags_scored": list(flags)})
    return plan.run_id


def selected_count(store: Store, run_id: str) -> int:
    return int(store.scalar("SELECT n_selected FROM label_runs WHERE run_id = ?", [run_id]))


def pending_pairs(store: Store, run_id: str) -> pd.DataFrame:
    """The run's selected pairs without a label from it yet, in selection order (columns of `select_pairs`)."""
    return store.df(sql.PENDING_ITEMS, {"run_id": run_id})


@contextmanager
def failing_run(store: Store, run_id: str, n_selected: int, n_pending: int) -> Iterator[None]:
    """Any exception inside marks the run 'failed' (its written labels stay; the next start resumes it)."""
    try:
        yield
    except BaseException as exc:
        store.finish_run(run_id, "failed", {"labelled_before_failure": n_selected - n_pending},
                         f"{type(exc).__name__}: {exc}")
        raise


def finish_label_run(store: Store, run_id: str, *, resumed: bool, labelled_now: int, seconds: float,
                     author: str) -> LabelJobResult:
    """Summarise the run's labels and mark it 'ok' with that summary."""
    result = _summarise(store, run_id, resumed, selected_count(store, run_id), labelled_now, seconds, author)
    store.finish_run(run_id, "ok", {k: v for k, v in asdict(result).items() if k not in ("run_id", "author")})
    return result


def job_labeler(job: LabelJob, policy: Policy | None = None, adapter: Adapter | None = None,
                retriever: RetrieverCosine | None = None) -> Labeler:
    """The `Labeler` that `job` describes (model, policy, backend, adapter, stack, backend options), so a
    caller that builds its own labeler for a job scores exactly as the job's fingerprint and author say;
    ``retriever``: the cosine a stack fitted with one reads (the caller loads it)."""
    return Labeler(job.model, policy or job.policy, backend=job.backend, adapter=adapter or job.adapter,
                   use_stack=job.use_stack, retriever=retriever, **job.backend_options)


def run_label_job(store: Store, job: LabelJob, *, labeler: Labeler | None = None, run_id: str | None = None,
                  new_run: bool = False, progress: bool = True,
                  on_chunk: Callable[[str, int], None] | None = None,
                  retriever: RetrieverCosine | None = None) -> LabelJobResult:
    """Label the selected pairs; resume the unfinished run of the same job unless `new_run`.

    `labeler` reuses an already built `Labeler` (its policy must be `job.policy`); otherwise one is
    built from the job, with `retriever` when its stack reads one. `on_chunk(run_id, n_done)` is called after
    each written chunk.
    """
    policy = labeler.policy if labeler is not None else load_prompt_policy(job.policy)
    adapter = check_adapter(job.adapter) if job.adapter else None
    plan = plan_run(store, job, policy, adapter, run_id=run_id, new_run=new_run)
    if labeler is None:
        labeler = job_labeler(job, policy, adapter, retriever)
    run_id = open_run(store, job, policy, plan, labeler.author, scored_flags(job, labeler))
    pending = with_judged_examples(store, labeler, pair_texts(pending_pairs(store, run_id)))
    n_selected = selected_count(store, run_id)
    with failing_run(store, run_id, n_selected, len(pending)):
        labelled_now, seconds = _label_chunks(store, labeler, pending, run_id, job, n_selected, progress, on_chunk)
    return finish_label_run(store, run_id, resumed=plan.resumed, labelled_now=labelled_now, seconds=seconds,
                            author=labeler.author)


def _start_run(store: Store, job: LabelJob, policy: Policy, author: str, job_fingerprint: str,
               selection: list[PairText], flags: Sequence[str]) -> str:
    run_id = new_run_id("label")
    params = {**asdict(job), "policy_version": policy.version, "author": author, "fingerprint": job_fingerprint,
              "flags_scored": list(flags)}
    store.start_run("label", params, run_id=run_id)
    items = pd.DataFrame({"ordinal": range(len(selection)), "pair_id": [p.pair_id for p in selection]})
    with store.transaction() as con:
        con.execute(sql.INSERT_LABEL_RUN, {
            "run_id": run_id, "fingerprint": job_fingerprint, "selection": job.select, "policy": policy.name,
            "policy_version": policy.version, "scheme": policy.scheme.name, "author": author,
            "n_selected": len(selection)})
        con.register("run_items_frame", items)
        try:
            con.execute(sql.INSERT_RUN_ITEMS, {"run_id": run_id})
        finally:
            con.unregister("run_items_frame")
    return run_id


def score_chunk(labeler: Labeler, chunk: list[PairText], with_flags: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(label probabilities, flag probabilities or None when flags are not scored) of `chunk`."""
    if not with_flags or not labeler.flag_names:
        return labeler.score(chunk), None
    return labeler.score_with_flags(chunk)


def _label_chunks(store: Store, labeler: Labeler, pending: list[PairText], run_id: str, job: LabelJob,
                  n_selected: int, show_progress: bool,
                  on_chunk: Callable[[str, int], None] | None) -> tuple[int, float]:
    done_before = n_selected - len(pending)
    labelled, seconds = 0, 0.0
    chunk_size = job.chunk_size
    with _progress(show_progress) as bar:
        task = bar.add_task("label", total=n_selected, completed=done_before, rate=0.0)
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start:start + chunk_size]
            began = time.perf_counter()
            probs, flag_probs = score_chunk(labeler, chunk, job.score_flags)
            seconds += time.perf_counter() - began
            labelled += store.add_labels(label_records([pair.pair_id for pair in chunk], probs,
                                                       scheme=labeler.policy.scheme, author=labeler.author,
                                                       run_id=run_id, threshold=job.review_threshold,
                                                       flag_probs=flag_probs, flag_names=labeler.flag_names,
                                                       chosen=labeler.choose_labels(probs)))
            bar.update(task, completed=done_before + start + len(chunk), rate=labelled / max(seconds, 1e-9))
            if on_chunk is not None:
                on_chunk(run_id, done_before + start + len(chunk))
    return labelled, seconds


def _summarise(store: Store, run_id: str, resumed: bool, n_selected: int, labelled_now: int, seconds: float,
               author: str) -> LabelJobResult:
    summary = store.df(sql.RUN_LABEL_SUMMARY, {"run_id": run_id})
    total = int(summary["n"].sum()) if len(summary) else 0
    mean_conf = float((summary["mean_confidence"] * summary["n"]).sum() / total) if total else None
    return LabelJobResult(
        run_id=run_id, resumed=resumed, n_selected=n_selected, n_labelled_now=labelled_now,
        label_counts={str(r.label): int(r.n) for r in summary.itertuples()}, mean_confidence=mean_conf,
        needs_review=int(summary["needs_review"].sum()) if total else 0,
        pairs_per_s=labelled_now / seconds if seconds > 0 else 0.0, author=author,
        flagged={str(r.flag): int(r.flagged) for r in store.df(sql.RUN_FLAG_SUMMARY, {"run_id": run_id}).itertuples()},
    )
