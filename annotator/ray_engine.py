"""`mnr label --engine ray`: the label job's scoring on Ray Data, with Parquet between the store and Ray.

The store stays the system of record; Ray only moves and scores pairs:

1. the run is planned and recorded as in-process (`annotator.batch`: same selection, fingerprint, frozen
   `label_run_items`, resume), and its pending pairs are written as Parquet to `<work dir>/<run id>/pairs/`;
2. `ray.data.read_parquet` -> `map_batches(ScorePairs, compute=ActorPoolStrategy(size=N), num_gpus=G)` ->
   `write_parquet` to `<work dir>/<run id>/scores/`. Each actor holds one `Labeler`, so prompts, label-token
   log-probabilities and temperature are the in-process engine's;
3. the scores come back through `batch.label_records` keyed `<run id>:<pair id>`: importing the same scores
   again adds nothing, and a resumed run first imports what an earlier attempt scored.

The policy's flags travel as `flag_<name>` columns beside the `p_<label>` columns (none with `--no-flags`).

Work folders are local paths or URLs that pyarrow and Ray both read (s3://, gs://, ...). Ray is an optional
dependency: it is imported only when a Ray job runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from annotator import sql
from annotator.batch import (LabelJob, LabelJobResult, failing_run, finish_label_run, label_records, open_run,
                             pair_texts, pending_pairs, plan_run, score_chunk, selected_count)
from annotator.judged import JudgedSettings
from annotator.labeler import (Adapter, Labeler, adapter_stack_version, check_adapter, check_policy, labeler_author,
                               model_tag, read_adapter_meta)
from annotator.pair_form import policy_for_adapter
from annotator.prompts import Policy, load_prompt_policy
from annotator.stack import stack_retriever
from labelstore.errors import MnrError
from labelstore.schemes import LabelScheme, load_scheme
from labelstore.store import Store

RAY_INSTALL_HINT = "pip install 'mine-refine[ray]'"
PAIR_SCHEMA = pa.schema([(name, pa.string()) for name in ("pair_id", "query", "title", "description", "brand")])
DEFAULT_ROWS_PER_FILE = 50_000
# Scores are float64 from the labeler; this only catches files that are not probabilities at all.
PROBABILITY_SUM_TOLERANCE = 1e-4


class RayEngineError(MnrError):
    """Ray is missing, or a Ray job's input or output is unusable (names the file, row and field)."""


def require_ray() -> ModuleType:
    """The `ray` module with Ray Data, or an error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayEngineError(f"--engine ray needs Ray Data, which is not installed here: {RAY_INSTALL_HINT} "
                             f"({exc})") from exc
    return ray


@dataclass(frozen=True)
class RaySettings:
    """Where the Parquet goes and how the Ray job runs.

    `address`: None starts (or reuses) a Ray in this process; "auto" or "ray://head:10001" joins a cluster.
    `concurrency`: scoring actors (one `Labeler` each); `num_gpus` / `num_cpus`: resources of one actor.
    `init_options`: more `ray.init` keyword arguments (e.g. `runtime_env`, `num_cpus` of a local Ray).
    """

    work_dir: str
    address: str | None = None
    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 64
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    init_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFolders:
    pairs: str
    scores: str


def run_folders(work_dir: str, run_id: str) -> RunFolders:
    base = f"{_absolute(work_dir).rstrip('/')}/{run_id}"
    return RunFolders(pairs=f"{base}/pairs", scores=f"{base}/scores")


def probability_column(label: str) -> str:
    return f"p_{label}"


FLAG_PREFIX = "flag_"
LABEL_COLUMN = "label"  # the label the labeler chose; a file without it gets the most probable label


def flag_column(flag: str) -> str:
    return f"{FLAG_PREFIX}{flag}"


# -- the Ray job -------------------------------------------------------------------------------
class ScorePairs:
    """Ray Data actor: one `Labeler` per actor; a pandas batch of pairs -> their scores (`scores_frame`)."""

    def __init__(self, *, model: str, policy: str, backend: str, adapter: str | None,
                 backend_options: dict[str, Any], use_stack: bool = True, score_flags: bool = True) -> None:
        self.labeler = Labeler(model, policy, backend=backend, adapter=adapter, use_stack=use_stack, **backend_options)
        self.score_flags = score_flags

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        probs, flag_probs = score_chunk(self.labeler, pair_texts(batch), self.score_flags)
        return scores_frame(batch["pair_id"].astype(str).tolist(), probs, self.labeler.label_names,
                            self.labeler.author, flag_probs, self.labeler.flag_names,
                            chosen=self.labeler.choose_labels(probs))


def scores_frame(pair_ids: list[str], probs: np.ndarray, label_names: list[str], author: str,
                 flag_probs: np.ndarray | None = None, flag_names: list[str] | None = None, *,
                 chosen: np.ndarray | None = None) -> pd.DataFrame:
    """Columns pair_id, author, p_<label> (float64) for every label of the scheme, with `chosen` ((n,) label
    indices: the labeler's decision) a `label` column of label names, and, with `flag_probs` (n, n_flags),
    flag_<name> (float64) for every flag."""
    columns: dict[str, Any] = {probability_column(name): probs[:, i].astype(np.float64)
                               for i, name in enumerate(label_names)}
    if chosen is not None:
        columns[LABEL_COLUMN] = [label_names[i] for i in chosen]
    if flag_probs is not None:
        columns.update({flag_column(name): flag_probs[:, i].astype(np.float64)
                        for i, name in enumerate(flag_names or [])})
    return pd.DataFrame({"pair_id": pair_ids, "author": [author] * len(pair_ids), **columns})


def score_parquet(pairs_url: str, scores_url: str, job: LabelJob, settings: RaySettings, *,
                  progress: bool = True) -> None:
    """Score the pairs Parquet at `pairs_url` with Ray Data into `scores_url` (the job's model/policy/backend)."""
    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=settings.address, include_dashboard=False, **settings.init_options)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        pairs = ray.data.read_parquet(_absolute(pairs_url))
        scored = pairs.map_batches(
            ScorePairs, batch_format="pandas", batch_size=settings.batch_size,
            compute=ray.data.ActorPoolStrategy(size=settings.concurrency),
            num_gpus=settings.num_gpus or None, num_cpus=settings.num_cpus,
            fn_constructor_kwargs=_actor_kwargs(job))
        scored.write_parquet(_absolute(scores_url))
    finally:
        if started_here:
            ray.shutdown()


def _actor_kwargs(job: LabelJob) -> dict[str, Any]:
    # Actors do not share the driver's working directory: local folders travel as absolute paths
    # (not resolved, so a symlinked model keeps the folder name its author tag is made of).
    model = str(Path(job.model).absolute()) if Path(job.model).is_dir() else job.model
    adapter = str(check_adapter(job.adapter).path) if job.adapter else None
    return {"model": model, "policy": job.policy, "backend": job.backend, "adapter": adapter,
            "backend_options": job.backend_options, "use_stack": job.use_stack, "score_flags": job.score_flags}


# -- Parquet in and out of the store -----------------------------------------------------------
def _absolute(url: str) -> str:
    return url if "://" in url else str(Path(url).expanduser().resolve())


def _filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(_absolute(url))
    except (pa.ArrowInvalid, OSError) as exc:
        raise RayEngineError(f"{url}: not a folder or URL pyarrow can open ({exc})") from exc


def _empty_folder(url: str) -> None:
    filesystem, path = _filesystem(url)
    filesystem.create_dir(path, recursive=True)
    filesystem.delete_dir_contents(path, missing_dir_ok=True)


def export_pairs(store: Store, run_id: str, url: str, *, rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> int:
    """Write the run's pending pairs (pair_id, query, title, description, brand) as Parquet files into the
    emptied folder `url`; returns how many pairs."""
    frame = pending_pairs(store, run_id)
    _empty_folder(url)
    filesystem, path = _filesystem(url)
    table = pa.Table.from_pandas(frame[PAIR_SCHEMA.names], schema=PAIR_SCHEMA, preserve_index=False)
    for number, start in enumerate(range(0, len(frame), rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), f"{path}/part-{number:05d}.parquet", filesystem=filesystem)
    return len(frame)


def _score_files(url: str) -> list[tuple[str, pa.Table]]:
    filesystem, path = _filesystem(url)
    listing = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted(info.path for info in listing if info.is_file and info.path.endswith(".parquet"))
    return [(name, pq.read_table(name, filesystem=filesystem)) for name in files]


@dataclass(frozen=True)
class ScoresFile:
    """The checked rows of one scores file: pair ids, label probabilities (scheme order) and flag probabilities."""

    pair_ids: list[str]
    probs: np.ndarray  # (n, n_labels)
    flag_names: list[str]
    flag_probs: np.ndarray | None  # (n, n_flags), None when the file has no flag columns
    chosen: np.ndarray | None = None  # (n,) label indices from the file's label column; None: most probable


def _checked_flags(name: str, table: pa.Table) -> tuple[list[str], np.ndarray | None]:
    columns = [column for column in table.column_names if column.startswith(FLAG_PREFIX)]
    if not columns:
        return [], None
    values = table.select(columns).to_pandas().to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise RayEngineError(f"{name} row {row + 1}, {columns[col]}: {values[row, col]} is not a probability")
    return [column.removeprefix(FLAG_PREFIX) for column in columns], values


def _checked_scores(name: str, table: pa.Table, scheme: LabelScheme, author: str, run_id: str,
                    members: set[str]) -> ScoresFile:
    """The pair ids, label and flag probabilities of one scores file, after checking every row."""
    columns = ["pair_id", "author", *(probability_column(label) for label in scheme.label_names)]
    for column in columns:
        if column not in table.column_names:
            raise RayEngineError(f"{name}: no column '{column}' (scores need {', '.join(columns)} "
                                 f"for scheme {scheme.name})")
    frame = table.select(columns).to_pandas()
    outside = ~frame["pair_id"].isin(members).to_numpy()
    if outside.any():
        row = int(np.argmax(outside))
        raise RayEngineError(f"{name} row {row + 1}: pair_id '{frame['pair_id'].iloc[row]}' is not a pair of "
                             f"run {run_id}")
    other_author = (frame["author"] != author).to_numpy()
    if other_author.any():
        row = int(np.argmax(other_author))
        raise RayEngineError(f"{name} row {row + 1}, author: '{frame['author'].iloc[row]}' is not run {run_id}'s "
                             f"author '{author}'")
    probs = frame[columns[2:]].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
    off = np.abs(probs.sum(axis=1) - 1.0) > PROBABILITY_SUM_TOLERANCE
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise RayEngineError(f"{name} row {row + 1}, {columns[2 + col]}: {probs[row, col]} is not a probability")
    if off.any():
        row = int(np.argmax(off))
        raise RayEngineError(f"{name} row {row + 1}: probabilities sum to {probs[row].sum():.6f}, not 1")
    flag_names, flag_probs = _checked_flags(name, table)
    return ScoresFile(frame["pair_id"].astype(str).tolist(), probs, flag_names, flag_probs,
                      _checked_labels(name, table, scheme))


def _checked_labels(name: str, table: pa.Table, scheme: LabelScheme) -> np.ndarray | None:
    if LABEL_COLUMN not in table.column_names:
        return None
    labels = table.column(LABEL_COLUMN).to_pylist()
    unknown = [row for row, label in enumerate(labels) if label not in scheme.label_names]
    if unknown:
        raise RayEngineError(f"{name} row {unknown[0] + 1}, {LABEL_COLUMN}: {labels[unknown[0]]!r} is not a label "
                             f"of scheme {scheme.name} ({', '.join(scheme.label_names)})")
    return np.array([scheme.label_names.index(label) for label in labels], dtype=int)


def import_scores(store: Store, run_id: str, url: str, *, threshold: float, chunk_size: int = 1024) -> int:
    """Add the scores under `url` as run `run_id`'s labels; every file is checked before any is written.

    Returns the labels added: rows whose (run, pair) label exists already are skipped, so importing the
    same scores twice adds nothing. A missing or empty folder adds nothing.
    """
    info = store.df(sql.LABEL_RUN_INFO, {"run_id": run_id})
    if info.empty:
        raise RayEngineError(f"no label run '{run_id}' in {store.path}")
    scheme, author = load_scheme(str(info["scheme"].iloc[0])), str(info["author"].iloc[0])
    members = set(store.df(sql.RUN_ITEM_IDS, {"run_id": run_id})["pair_id"])
    checked = [_checked_scores(name, table, scheme, author, run_id, members) for name, table in _score_files(url)]
    added = 0
    for scores in checked:
        for start in range(0, len(scores.pair_ids), chunk_size):
            window = slice(start, start + chunk_size)
            flag_probs = scores.flag_probs[window] if scores.flag_probs is not None else None
            chosen = scores.chosen[window] if scores.chosen is not None else None
            added += store.add_labels(label_records(scores.pair_ids[window], scores.probs[window], scheme=scheme,
                                                    author=author, run_id=run_id, threshold=threshold,
                                                    flag_probs=flag_probs, flag_names=scores.flag_names,
                                                    chosen=chosen))
    return added


# -- the whole job, and its halves for a Ray cluster that cannot see the store ----------------
def job_author(job: LabelJob, policy: Policy, adapter: Adapter | None) -> str:
    """The author the job's labeler writes, known without loading the model (in the adapter's pair form,
    as `Labeler` renders it)."""
    if adapter is not None:
        policy = policy_for_adapter(policy, read_adapter_meta(adapter.path))
    return labeler_author(model_tag(job.model, adapter, adapter_stack_version(adapter, job.use_stack)), policy)


@dataclass(frozen=True)
class RayRun:
    """A label run whose pending pairs wait in `folders.pairs` for the Ray job."""

    run_id: str
    resumed: bool
    folders: RunFolders
    n_exported: int
    n_imported: int


def refuse_retriever_stack(job: LabelJob) -> None:
    """`RayEngineError` when the job's stack reads a retriever's cosine: the Ray actors do not load retrievers."""
    retriever = stack_retriever(job.adapter) if job.adapter and job.use_stack else None
    if retriever is not None:
        raise RayEngineError(f"adapter {job.adapter}: its stack reads retriever {retriever}'s cosine, which the "
                             "Ray actors do not load: label with --engine local, or --no-stack")


def export_run(store: Store, job: LabelJob, settings: RaySettings, *, run_id: str | None = None,
               new_run: bool = False) -> RayRun:
    """Start (or resume) the job's run as in-process, import what an earlier attempt scored, and write the
    still pending pairs to `<work dir>/<run id>/pairs/`. Scores already there stay: importing them again
    adds nothing, and the Ray job adds its files beside them."""
    policy = load_prompt_policy(job.policy)
    adapter = check_adapter(job.adapter) if job.adapter else None
    if adapter is not None:  # refuse a mismatched adapter before a run is recorded, as the in-process engine does
        check_policy(adapter.path, read_adapter_meta(adapter.path), policy)
    refuse_retriever_stack(job)
    if adapter is not None and JudgedSettings.from_meta(read_adapter_meta(adapter.path)) is not None:
        raise RayEngineError(f"adapter {job.adapter} shows judged examples in its prompts, which the Ray export does "
                             "not carry yet: label with --engine local")
    plan = plan_run(store, job, policy, adapter, run_id=run_id, new_run=new_run)
    run_id = open_run(store, job, policy, plan, job_author(job, policy, adapter),
                      policy.flag_names if job.score_flags else [])
    folders = run_folders(settings.work_dir, run_id)
    with failing_run(store, run_id, selected_count(store, run_id), len(pending_pairs(store, run_id))):
        imported = import_scores(store, run_id, folders.scores, threshold=job.review_threshold,
                                 chunk_size=job.chunk_size)
        exported = export_pairs(store, run_id, folders.pairs, rows_per_file=settings.rows_per_file)
    return RayRun(run_id=run_id, resumed=plan.resumed, folders=folders, n_exported=exported, n_imported=imported)


def import_run(store: Store, job: LabelJob, run_id: str, scores_url: str, *, resumed: bool = True,
               labelled_before: int = 0, seconds: float = 0.0) -> LabelJobResult:
    """Import the run's scores and mark it 'ok', or 'failed' (resumable) while some pair has no score."""
    info = store.df(sql.LABEL_RUN_INFO, {"run_id": run_id})
    if info.empty:
        raise RayEngineError(f"no label run '{run_id}' in {store.path} to import scores into")
    pending = len(pending_pairs(store, run_id))
    with failing_run(store, run_id, selected_count(store, run_id), pending):
        added = import_scores(store, run_id, scores_url, threshold=job.review_threshold, chunk_size=job.chunk_size)
        left = len(pending_pairs(store, run_id))
        if left:
            raise RayEngineError(f"{left} pair(s) of run {run_id} got no score in {scores_url}; run "
                                 "`mnr label --engine ray` with the same options again to score them")
    return finish_label_run(store, run_id, resumed=resumed, labelled_now=labelled_before + added, seconds=seconds,
                            author=str(info["author"].iloc[0]))


def run_ray_label_job(store: Store, job: LabelJob, settings: RaySettings, *, run_id: str | None = None,
                      new_run: bool = False, progress: bool = True) -> LabelJobResult:
    """`run_label_job` with the scoring on Ray Data: same selection, resume and labels; see the module doc."""
    refuse_retriever_stack(job)
    require_ray()
    run = export_run(store, job, settings, run_id=run_id, new_run=new_run)
    seconds = 0.0
    if run.n_exported:
        began = time.perf_counter()
        with failing_run(store, run.run_id, selected_count(store, run.run_id), run.n_exported):
            score_parquet(run.folders.pairs, run.folders.scores, job, settings, progress=progress)
        seconds = time.perf_counter() - began
    return import_run(store, job, run.run_id, run.folders.scores, resumed=run.resumed,
                      labelled_before=run.n_imported, seconds=seconds)
