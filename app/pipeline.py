"""The Mine and Refine loop as named, resumable steps recorded in the store.

A *loop run* is a row in `runs` with kind 'loop'. Each step it executes is a child run with kind
'loop:<step>' and `parent_run_id` = the loop run. A step returns a dict of outputs (model ids,
paths, metrics); the framework stores it, with the step's wall time and throughput, as that
child run's `metrics` JSON. Later steps, and later invocations of the loop, read earlier outputs
back from the store, never from memory, so a loop can stop anywhere and continue.

Resuming: `run_loop` continues the latest loop run at its first step whose latest attempt is not
'ok'. When the latest loop run finished every step, a new loop run starts. `from_step` re-runs a
step and everything after it; `only_step` re-runs one step; `fresh` starts a new loop run.

A step that raises stops the loop: the step run and the loop run are marked 'failed' with the
error, finished steps stay 'ok', and `StepFailed` says which step failed and how to continue.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from labelstore.config import load_config
from labelstore.errors import MnrError
from labelstore.store import Store

STEP_NAMES: tuple[str, ...] = (
    "ingest", "train-stage1", "mine", "relabel", "engagement", "audit", "trigger", "train-stage2",
    "evaluate", "promote",
)
LOOP_KIND = "loop"


class StepFailed(MnrError):
    """A loop step raised; the message names the step, the cause and how to continue."""

    def __init__(self, step: str, loop_run_id: str, cause: BaseException, resume_hint: str):
        self.step = step
        self.loop_run_id = loop_run_id
        cause_text = str(cause) if isinstance(cause, MnrError) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"loop step '{step}' failed (loop run {loop_run_id}): {cause_text}\n"
            f"Finished steps are kept. Fix the cause, then run `{resume_hint}` to continue from '{step}'."
        )


# -- configuration ---------------------------------------------------------------------------
@dataclass
class LoopConfig:
    """The `[loop]` section of mnr.toml (see mnr.example.toml for every key).

    `options(step)` is the `[loop.<step>]` table (e.g. `[loop.relabel]`), `{}` when absent.
    """

    loop: dict[str, Any] = field(default_factory=dict)
    source_path: Path | None = None
    whole: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> "LoopConfig":
        path = Path(path)
        if not path.is_file():
            raise MnrError(f"{path}: no such config file (copy mnr.example.toml to start one)")
        whole = load_config(path)
        loop = whole.get("loop", {})
        if not isinstance(loop, dict):
            raise MnrError(f"{path}: [loop] must be a table")
        return cls(loop=loop, source_path=path, whole=whole)

    @property
    def where(self) -> str:
        return str(self.source_path) if self.source_path else "the loop config"

    def options(self, step: str) -> dict[str, Any]:
        key = step.replace("-", "_")
        value = self.loop.get(key, {})
        if not isinstance(value, dict):
            raise MnrError(f"{self.where}: [loop.{key}] must be a table")
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self.loop.get(key, default)

    @property
    def workspace(self) -> Path:
        """Folder for models, reports and data samples (relative: to the config file's folder)."""
        return self.resolve(str(self.loop.get("workspace", "mnr-workspace")))

    @property
    def scheme(self) -> str:
        return str(self.loop.get("scheme", "esci"))

    @property
    def dataset(self) -> str:
        return str(self.loop.get("dataset", "synthetic"))

    def resolve(self, value: str | Path) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(value)
        if path.is_absolute() or self.source_path is None:
            return path
        return self.source_path.parent / path


# -- step context ----------------------------------------------------------------------------
@dataclass
class StepContext:
    """What a step function gets: the store, the config, and earlier steps' outputs."""

    store: Store
    config: LoopConfig
    loop_run_id: str
    step: str
    run_id: str
    log: Callable[[str], None] = print

    @property
    def options(self) -> dict[str, Any]:
        return self.config.options(self.step)

    @property
    def workspace(self) -> Path:
        path = self.config.workspace
        path.mkdir(parents=True, exist_ok=True)
        return path

    def output(self, step: str) -> dict[str, Any]:
        """The outputs of `step`'s latest 'ok' run, preferring this loop run's; raise if it never ran."""
        found = latest_step_outputs(self.store, step, self.loop_run_id)
        if found is None:
            raise MnrError(f"step '{self.step}' needs the outputs of step '{step}', which has not finished; "
                           f"run `mnr run --from {step}`")
        return found


StepFunction = Callable[[StepContext], dict[str, Any]]


def latest_step_outputs(store: Store, step: str, loop_run_id: str | None = None) -> dict[str, Any] | None:
    """Outputs of the latest 'ok' run of `step`: within `loop_run_id` when it has one, else any loop's."""
    row = store.fetchall(
        "SELECT metrics FROM runs WHERE kind = ? AND status = 'ok' "
        "ORDER BY (parent_run_id IS NOT DISTINCT FROM ?) DESC, finished_at DESC LIMIT 1",
        [f"{LOOP_KIND}:{step}", loop_run_id],
    )
    if not row:
        return None
    return json.loads(row[0][0] or "{}")


# -- planning --------------------------------------------------------------------------------
@dataclass
class LoopPlan:
    loop_run_id: str | None  # None: start a new loop run
    steps: list[str]
    reason: str


def latest_loop_run(store: Store) -> tuple[str, str] | None:
    """(run_id, status) of the newest loop run, or None."""
    rows = store.fetchall(
        "SELECT run_id, status FROM runs WHERE kind = ? ORDER BY started_at DESC, run_id DESC LIMIT 1", [LOOP_KIND]
    )
    return (rows[0][0], rows[0][1]) if rows else None


def step_statuses(store: Store, loop_run_id: str) -> dict[str, str]:
    """Each step's latest attempt status within a loop run ('ok', 'failed', 'running'); absent: never ran."""
    rows = store.fetchall(
        "SELECT kind, arg_max(status, started_at) FROM runs WHERE parent_run_id = ? AND kind LIKE ? GROUP BY kind",
        [loop_run_id, f"{LOOP_KIND}:%"],
    )
    return {kind.split(":", 1)[1]: status for kind, status in rows}


def check_step(name: str | None) -> None:
    if name is not None and name not in STEP_NAMES:
        raise MnrError(f"unknown step '{name}'; the steps are: {', '.join(STEP_NAMES)}")


def plan_loop(store: Store, *, from_step: str | None = None, only_step: str | None = None,
              fresh: bool = False) -> LoopPlan:
    """Which loop run to continue and which steps to run, in order."""
    check_step(from_step)
    check_step(only_step)
    if from_step and only_step:
        raise MnrError("give --from or --only, not both")
    latest = None if fresh else latest_loop_run(store)
    if only_step:
        return LoopPlan(latest[0] if latest else None, [only_step], f"--only {only_step}")
    if from_step:
        return LoopPlan(latest[0] if latest else None, list(STEP_NAMES[STEP_NAMES.index(from_step):]),
                        f"--from {from_step}")
    if latest is None:
        return LoopPlan(None, list(STEP_NAMES), "fresh loop" if fresh else "first loop in this store")
    statuses = step_statuses(store, latest[0])
    pending = [step for step in STEP_NAMES if statuses.get(step) != "ok"]
    if not pending:
        return LoopPlan(None, list(STEP_NAMES), f"loop {latest[0]} finished; starting a new loop")
    return LoopPlan(latest[0], list(STEP_NAMES[STEP_NAMES.index(pending[0]):]),
                    f"continuing loop {latest[0]} at step '{pending[0]}'")


# -- validation ------------------------------------------------------------------------------
LOOP_KEYS = ("workspace", "dataset", "scheme", "holdout_fraction", "seed")


def _dataclass_keys(path: str, name: str, drop: tuple[str, ...] = ()) -> set[str]:
    module = importlib.import_module(path)
    return {f.name for f in dataclasses.fields(getattr(module, name))} - set(drop)


def known_step_keys(step: str) -> set[str]:
    """The keys `[loop.<step>]` accepts."""
    train = _dataclass_keys("trainer.train", "TrainConfig", ("stage", "scheme", "dataset", "holdout_fraction", "seed"))
    keys: dict[str, Callable[[], set[str]]] = {
        "ingest": lambda: {"source", "n_families", "seed", "path", "preset", "encoding", "sample_queries"},
        "train-stage1": lambda: train,
        "mine": lambda: _dataclass_keys("trainer.mining", "MiningConfig"),
        "relabel": lambda: set(RELABEL_KEYS),
        "engagement": lambda: {"source", "path", "format", "ubi_queries", "mapping"}
        | _dataclass_keys("auditor.simulate", "SimulationParams"),
        "audit": lambda: set(),
        "trigger": lambda: {"force"},
        "train-stage2": lambda: train,
        "evaluate": lambda: {"k", "bm25", "labels"},
        "promote": lambda: {"metric", "min_gain"},
    }
    return keys[step]()


def validate_config(config: LoopConfig) -> None:
    """Raise one `MnrError` listing every unknown key of [loop] and its step tables."""
    tables = {step.replace("-", "_"): step for step in STEP_NAMES}
    problems = [f"[loop] {key}: unknown key (known: {', '.join(LOOP_KEYS)} and the step tables "
                f"{', '.join(f'[loop.{t}]' for t in tables)})"
                for key in config.loop if key not in LOOP_KEYS and key not in tables]
    for table, step in tables.items():
        unknown = sorted(set(config.options(step)) - known_step_keys(step))
        if unknown:
            problems.append(f"[loop.{table}]: unknown key(s) {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known_step_keys(step)))})")
    if problems:
        raise MnrError(f"{config.where}: " + "; ".join(problems))


# -- running ---------------------------------------------------------------------------------
@dataclass
class LoopResult:
    loop_run_id: str
    ran: list[str]
    outputs: dict[str, dict[str, Any]]


def run_loop(store: Store, config: LoopConfig, *, from_step: str | None = None, only_step: str | None = None,
             fresh: bool = False, steps: dict[str, StepFunction] | None = None,
             log: Callable[[str], None] = print, resume_hint: str = "mnr run") -> LoopResult:
    """Run the planned steps in order; each is a child run of the loop run. Raises `StepFailed`."""
    steps = STEPS if steps is None else steps
    validate_config(config)
    plan = plan_loop(store, from_step=from_step, only_step=only_step, fresh=fresh)
    params = {"config": config.where, "from": from_step, "only": only_step, "fresh": fresh}
    loop_run_id = store.start_run(LOOP_KIND, params, run_id=plan.loop_run_id)
    log(f"loop {loop_run_id}: {plan.reason}; steps: {', '.join(plan.steps)}")
    outputs: dict[str, dict[str, Any]] = {}
    for name in plan.steps:
        outputs[name] = _run_step(store, config, loop_run_id, name, steps[name], log, resume_hint)
    statuses = step_statuses(store, loop_run_id)
    done = all(statuses.get(step) == "ok" for step in STEP_NAMES)
    store.finish_run(loop_run_id, "ok" if done else "partial", {"steps": statuses})
    return LoopResult(loop_run_id, plan.steps, outputs)


def _run_step(store: Store, config: LoopConfig, loop_run_id: str, name: str, function: StepFunction,
              log: Callable[[str], None], resume_hint: str) -> dict[str, Any]:
    run_id = store.start_run(f"{LOOP_KIND}:{name}", config.options(name), parent_run_id=loop_run_id)
    context = StepContext(store, config, loop_run_id, name, run_id, log)
    log(f"[{name}] started")
    started = time.perf_counter()
    try:
        outputs = dict(function(context) or {})
    except BaseException as exc:
        wall = time.perf_counter() - started
        error = str(exc) if isinstance(exc, MnrError) else f"{type(exc).__name__}: {exc}"
        store.finish_run(run_id, "failed", {"wall_s": round(wall, 3)}, error)
        store.finish_run(loop_run_id, "failed", {"failed_step": name}, f"step '{name}': {error}")
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise StepFailed(name, loop_run_id, exc, resume_hint) from exc
    wall = time.perf_counter() - started
    outputs["wall_s"] = round(wall, 3)
    if outputs.get("items") is not None and wall > 0:
        outputs["items_per_s"] = round(float(outputs["items"]) / wall, 3)
    store.finish_run(run_id, "ok", outputs)
    log(f"[{name}] ok in {wall:.1f}s" + (f": {outputs['items']} {outputs.get('unit', 'items')}"
                                        if outputs.get("items") is not None else ""))
    return outputs


def loop_summary(store: Store, loop_run_id: str) -> dict[str, dict[str, Any]]:
    """Each step's latest 'ok' outputs for a loop run (steps that never finished are absent)."""
    rows = store.fetchall(
        "SELECT kind, arg_max(metrics, finished_at) FROM runs WHERE parent_run_id = ? AND kind LIKE ? "
        "AND status = 'ok' GROUP BY kind",
        [loop_run_id, f"{LOOP_KIND}:%"],
    )
    return {kind.split(":", 1)[1]: json.loads(metrics or "{}") for kind, metrics in rows}


# -- the steps -------------------------------------------------------------------------------
def _count_pairs(store: Store, dataset: str) -> int:
    return int(store.scalar("SELECT count(*) FROM pairs WHERE dataset = ?", [dataset]) or 0)


def sample_by_query(path: Path, preset: str | None, sample_queries: int, seed: int, out_dir: Path,
                    encoding: str | None = None) -> Path:
    """A CSV of every row of `sample_queries` queries of a labelled file, chosen by a seeded draw.

    Rows of one query stay together so retrieval has complete judgment lists. Written once to
    `out_dir/<stem>-<n>q-seed<seed>.csv` and reused: the sample is fixed for a given (n, seed).
    """
    from labelstore.ingest import PRESETS, guess_format, read_rows, resolve_mapping

    out = out_dir / f"{path.stem}-{sample_queries}q-seed{seed}.csv"
    if out.is_file():
        return out
    chosen = PRESETS.get(preset) if preset else None
    encodings = (encoding,) if encoding else (chosen.encodings if chosen else ("utf-8",))
    columns, rows, _ = read_rows(path, guess_format(path), encodings)
    query_column = resolve_mapping(columns, chosen, {}).get("query")
    if query_column not in columns:
        raise MnrError(f"{path}: cannot sample by query: no query column (have: {', '.join(columns)})")
    queries = sorted({str(row[query_column]).strip().lower() for row in rows})
    rng = random.Random(seed)
    keep = set(rng.sample(queries, min(sample_queries, len(queries))))
    sample = [row for row in rows if str(row[query_column]).strip().lower() in keep]
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    pd.DataFrame(sample, columns=columns).to_csv(partial, index=False)
    partial.replace(out)
    return out


def step_ingest(ctx: StepContext) -> dict[str, Any]:
    """Bring labelled pairs into the store: a generated catalog, a file (optionally sampled), or nothing."""
    options = ctx.options
    source = str(options.get("source", "catalog"))
    dataset = ctx.config.dataset
    if source == "catalog":
        from labelstore.catalog import generate_catalog, write_catalog

        if ctx.config.scheme != "esci":
            raise MnrError(f"{ctx.config.where}: the generated catalog is labelled in scheme 'esci', "
                           f"but [loop] scheme = '{ctx.config.scheme}'")
        catalog = generate_catalog(n_families=int(options.get("n_families", 12)), seed=int(options.get("seed", 0)),
                                   dataset=dataset)
        inserted = write_catalog(ctx.store, catalog, dataset=dataset)
        rows = len(catalog.judgments)
    elif source == "file":
        from labelstore.ingest import PRESETS, ingest_file

        if "path" not in options:
            raise MnrError(f"{ctx.config.where}: [loop.ingest] source = 'file' needs a `path`")
        path = ctx.config.resolve(str(options["path"]))
        preset = options.get("preset")
        expected = PRESETS[preset].scheme if preset in PRESETS else options.get("scheme", ctx.config.scheme)
        if expected != ctx.config.scheme:
            raise MnrError(f"{ctx.config.where}: [loop.ingest] gives scheme '{expected}' but [loop] scheme = "
                           f"'{ctx.config.scheme}'; make them the same")
        if int(options.get("sample_queries", 0)) > 0:
            path = sample_by_query(path, preset, int(options["sample_queries"]), int(options.get("seed", 0)),
                                   ctx.workspace / "data", options.get("encoding"))
        result = ingest_file(ctx.store, path, preset=preset, scheme=ctx.config.scheme, dataset=dataset,
                             encoding=options.get("encoding"))
        inserted, rows = result.inserted, result.rows_read
    elif source == "store":
        inserted, rows = {}, 0
    else:
        raise MnrError(f"{ctx.config.where}: [loop.ingest] source must be 'catalog', 'file' or 'store', not '{source}'")
    pairs = _count_pairs(ctx.store, dataset)
    if pairs == 0:
        raise MnrError(f"{ctx.store.path}: no pairs of dataset '{dataset}' after ingest; check [loop] dataset")
    return {"source": source, "dataset": dataset, "scheme": ctx.config.scheme, "pairs": pairs,
            "inserted": inserted, "items": rows, "unit": "rows"}


def _dataclass_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that are fields of dataclass `cls` (`validate_config` rejected the rest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def _train(ctx: StepContext, stage: str, start_from: str | None, parent_model_id: str | None) -> dict[str, Any]:
    from trainer.train import TrainConfig, run_training

    values = {**_dataclass_values(TrainConfig, ctx.options), **_shared_split(ctx)}
    config = TrainConfig(stage=stage, scheme=ctx.config.scheme, dataset=ctx.config.dataset, **values)
    # A fixed folder per loop run and stage: a re-run of a failed step resumes from its checkpoint.
    out = ctx.workspace / "models" / f"{stage}-{ctx.loop_run_id}"
    model_id, result = run_training(ctx.store, config, start_from=start_from, parent_model_id=parent_model_id,
                                    out=out, evaluate=False, show_progress=False)
    return {"model_id": model_id, "path": str(result.path), "steps": result.steps,
            "train_pairs_per_s": round(result.metrics.get("train_pairs_per_s", 0.0), 2),
            "loss_first": result.metrics.get("loss_first"), "loss_last20": result.metrics.get("loss_last20"),
            "items": int(result.metrics.get("train_pairs_seen", 0)), "unit": "pairs"}


def _shared_split(ctx: StepContext) -> dict[str, Any]:
    """The held-out split every step agrees on: [loop] holdout_fraction and seed."""
    return {"holdout_fraction": float(ctx.config.get("holdout_fraction", 0.2)), "seed": int(ctx.config.get("seed", 0))}


def step_train_stage1(ctx: StepContext) -> dict[str, Any]:
    """Stage 1: label-aware SupCon from all-MiniLM-L6-v2 on the current labels."""
    from trainer.registry import ensure_zero_shot

    return _train(ctx, "stage1", None, ensure_zero_shot(ctx.store))


def step_mine(ctx: StepContext) -> dict[str, Any]:
    """Mine hard pairs with the Stage 1 retriever (faiss): ambiguous unlabelled and label-disputing pairs."""
    from trainer.mining import REASONS, MiningConfig, mine
    from trainer.model import TwoTowerModel

    stage1 = ctx.output("train-stage1")
    values = _dataclass_values(MiningConfig, ctx.options)
    if values.get("band") is not None:
        values["band"] = tuple(values["band"])
    model = TwoTowerModel.from_pretrained(stage1["path"])
    run_id, candidates, metrics = mine(ctx.store, model, ctx.config.scheme, ctx.config.dataset, MiningConfig(**values),
                                      model_id=stage1["model_id"])
    by_reason = {reason: int((candidates["reason"] == reason).sum()) for reason in REASONS}
    return {"mining_run_id": run_id, "candidates": int(len(candidates)), "by_reason": by_reason,
            "new_pairs": int(metrics.get("inserted_pairs", 0)), "items": int(metrics.get("n_queries", 0)),
            "unit": "queries"}


RELABEL_KEYS = ("backend", "model", "policy", "adapter", "max_pairs", "chunk_size", "review_threshold",
                "backend_options")


def step_relabel(ctx: StepContext) -> dict[str, Any]:
    """Label the mined pairs with the policy-prompted LLM (LoRA adapter when configured); resumable."""
    from annotator.batch import LabelJob, run_label_job
    from annotator.models import PULLABLE, list_models, pull

    options = ctx.options
    model = str(options.get("model", "smollm2"))
    if model in PULLABLE and model not in list_models():
        ctx.log(f"[relabel] pulling {model} into the model cache (once)")
        pull(model)
    adapter = options.get("adapter")
    mining_run = ctx.output("mine")["mining_run_id"]
    job = LabelJob(model=model, policy=str(options.get("policy", ctx.config.scheme)), select="mined",
                   backend=str(options.get("backend", "vllm")),
                   adapter=str(ctx.config.resolve(str(adapter))) if adapter else None,
                   limit=int(options["max_pairs"]) if options.get("max_pairs") else None, dataset=ctx.config.dataset,
                   mining_run=mining_run, chunk_size=int(options.get("chunk_size", 64)),
                   review_threshold=options.get("review_threshold"),
                   backend_options=dict(options.get("backend_options", {})))
    result = run_label_job(ctx.store, job, progress=False)
    return {"label_run_id": result.run_id, "resumed": result.resumed, "selected": result.n_selected,
            "labelled_now": result.n_labelled_now, "label_counts": result.label_counts,
            "mean_confidence": result.mean_confidence, "needs_review": result.needs_review,
            "llm_pairs_per_s": round(result.pairs_per_s, 2), "author": result.author,
            "items": result.n_selected, "unit": "pairs"}


# Ground truth: each pair's newest imported label (human judgments, or the generated catalog's
# labels by construction), never the LLM's. The simulated log is drawn from it, so the audit can
# catch LLM errors, and the held-out test set is graded by it, so relabels never move the test set.
IMPORT_TRUTH_SQL = """
SELECT l.pair_id, p.query_id, q.text AS query_text, p.product_id, p.dataset,
       arg_max(l.label, l.created_at) AS label, arg_max(l.grade, l.created_at) AS grade
FROM labels l JOIN pairs p USING (pair_id) JOIN queries q USING (query_id)
WHERE l.source = 'import' AND l.scheme = $scheme AND p.dataset = $dataset
GROUP BY l.pair_id, p.query_id, q.text, p.product_id, p.dataset
"""


def step_engagement(ctx: StepContext) -> dict[str, Any]:
    """Add engagement events: simulated from the imported labels, read from a file, or those already stored."""
    options = dict(ctx.options)
    source = str(options.pop("source", "simulate"))
    where = f"{ctx.config.where} [loop.engagement]"
    if source == "simulate":
        from auditor.simulate import SimulationParams, simulate_into_store

        truth = ctx.store.df(IMPORT_TRUTH_SQL, {"scheme": ctx.config.scheme, "dataset": ctx.config.dataset})
        if truth.empty:
            raise MnrError(f"{ctx.store.path}: no imported labels of scheme '{ctx.config.scheme}' in dataset "
                           f"'{ctx.config.dataset}' to simulate engagement from")
        params = SimulationParams(**_dataclass_values(SimulationParams, options))
        from labelstore.schemes import load_scheme

        added = simulate_into_store(ctx.store, truth, params, load_scheme(ctx.config.scheme).max_grade)
    elif source == "file":
        from auditor.ingest import ingest_events

        if "path" not in options:
            raise MnrError(f"{where}: source = 'file' needs a `path` (CSV, Parquet, JSONL or UBI events)")
        path = ctx.config.resolve(str(options["path"]))
        if not path.exists():
            raise MnrError(f"{where}: engagement file {path} does not exist")
        ubi_queries = ctx.config.resolve(str(options["ubi_queries"])) if options.get("ubi_queries") else None
        result = ingest_events(ctx.store, path, fmt=options.get("format"), dataset=ctx.config.dataset,
                               mapping=options.get("mapping"), ubi_queries=ubi_queries)
        added = result.inserted
    elif source == "parquet":
        if "path" not in options:
            raise MnrError(f"{where}: source = 'parquet' needs a `path` (a Parquet file, folder, glob or s3:// URL)")
        events_path = _location(ctx.config, str(options["path"]))
        total, simulated = _parquet_event_counts(events_path)
        return {"source": source, "events_path": events_path, "events_added": 0, "events_total": total,
                "simulated": simulated, "items": total, "unit": "events (read in place)"}
    elif source == "store":
        added = 0
    else:
        raise MnrError(f"{where}: source must be 'simulate', 'file', 'parquet' or 'store', not '{source}'")
    total, simulated = ctx.store.fetchall(
        "SELECT count(*), coalesce(bool_or(simulated), false) FROM engagement_events WHERE dataset = ?",
        [ctx.config.dataset])[0]
    if total == 0:
        raise MnrError(f"{ctx.store.path}: no engagement events for dataset '{ctx.config.dataset}'; the audit needs some")
    return {"source": source, "events_path": None, "events_added": added, "events_total": total,
            "simulated": simulated, "items": added, "unit": "events"}


def _location(config: LoopConfig, value: str) -> str:
    """A local path resolved against the config's folder; URLs (s3://, gs://, https://) as given."""
    return value if "://" in value else str(config.resolve(value))


def _parquet_event_counts(events_path: str) -> tuple[int, bool]:
    """(events, any simulated) of Parquet events read in place, through the auditor's own reader."""
    import duckdb

    from auditor.metrics import attach_events

    with duckdb.connect() as con:
        attach_events(con, events_path)
        total, simulated = con.execute("SELECT count(*), coalesce(bool_or(simulated), false) FROM audit_events").fetchone()
    if total == 0:
        raise MnrError(f"{events_path}: no engagement events in it; the audit needs some")
    return int(total), bool(simulated)


def step_audit(ctx: StepContext) -> dict[str, Any]:
    """Audit the current labels against engagement and the retriever, write the HTML + JSON report."""
    from auditor.audit import run_audit
    from auditor.report import write_report
    from auditor.settings import AuditSettings

    settings = AuditSettings.from_config(ctx.config.whole.get("auditor", {}))
    result = run_audit(ctx.store, ctx.config.scheme, settings, ctx.output("engagement").get("events_path"))
    report = write_report(ctx.store, result, ctx.workspace / "reports" / result.run_id, settings)
    summary = result.summary
    return {"audit_run_id": result.run_id, "report": str(report.resolve()), "flags": summary["flags"],
            "flagged_pairs": summary["flagged_pairs"], "flags_by_kind": summary["flags_by_kind"],
            "queued": summary["queued"], "drift_alarms": summary["drift_alarm_total"],
            "simulated": summary["simulated"], "items": summary["pairs_with_events"], "unit": "pairs"}


def step_trigger(ctx: StepContext) -> dict[str, Any]:
    """Decide whether to refine (the [trigger] policy); `[loop.trigger] force = true` always refines."""
    from app.trigger import run_trigger
    from auditor.trigger import TriggerPolicy

    policy = TriggerPolicy.from_config(ctx.config.whole.get("trigger", {}))
    outcome = run_trigger(ctx.store, ctx.config.scheme, policy, launch=False)
    force = bool(ctx.options.get("force", False))
    reasons = list(outcome.decision.reasons) + (["forced by [loop.trigger] force = true"] if force else [])
    return {"trigger_run_id": outcome.run_id, "fired": outcome.decision.fire, "refine": outcome.decision.fire or force,
            "reasons": reasons, "counts": dataclasses.asdict(outcome.counts)}


def step_train_stage2(ctx: StepContext) -> dict[str, Any]:
    """Stage 2: multi-class circle loss from the Stage 1 model, on the current (relabelled) labels."""
    decision = ctx.output("trigger")
    if not decision.get("refine", True):
        return {"skipped": True, "reason": "the trigger held: " + "; ".join(decision.get("reasons", []))}
    stage1 = ctx.output("train-stage1")
    return _train(ctx, "stage2", stage1["path"], stage1["model_id"])


def step_evaluate(ctx: StepContext) -> dict[str, Any]:
    """Graded retrieval metrics on the held-out queries for zero-shot, Stage 1, Stage 2 and the promoted model."""
    from trainer.data import load_labelled_pairs, load_products
    from trainer.evaluation import evaluate_systems
    from trainer.model import TwoTowerModel
    from trainer.registry import ensure_zero_shot, model_row, promoted_model, record_metrics

    candidates = {"zero-shot": ensure_zero_shot(ctx.store), "stage1": ctx.output("train-stage1")["model_id"]}
    stage2 = ctx.output("train-stage2")
    if stage2.get("model_id"):
        candidates["stage2"] = stage2["model_id"]
    promoted = promoted_model(ctx.store)
    if promoted and promoted not in candidates.values():
        candidates["promoted"] = promoted
    split = _shared_split(ctx)
    pairs = load_labelled_pairs(ctx.store, ctx.config.scheme, ctx.config.dataset)
    _, held_out = pairs.split(split["holdout_fraction"], split["seed"])
    if str(ctx.options.get("labels", "import")) == "import":
        held_out = _with_import_grades(ctx, held_out)
    if held_out.frame.empty:
        raise MnrError(f"no held-out queries (holdout_fraction {split['holdout_fraction']}); raise [loop] holdout_fraction")
    products = load_products(ctx.store, ctx.config.dataset)
    systems = {name: TwoTowerModel.from_pretrained(model_row(ctx.store, model_id)["path"])
               for name, model_id in candidates.items()}
    if ctx.options.get("bm25", True):
        systems["bm25"] = None
    reports = {report.system: report for report in evaluate_systems(held_out, products, systems,
                                                                       k=int(ctx.options.get("k", 100)))}
    for name, model_id in candidates.items():
        record_metrics(ctx.store, model_id, {f"heldout_{k}": v for k, v in reports[name].metrics.items()})
    metrics = {name: {k: round(v, 4) for k, v in report.metrics.items()} for name, report in reports.items()}
    return {"models": candidates, "metrics": metrics,
            "ndcg@10": {name: metrics[name]["ndcg@10"] for name in metrics},
            "held_out_queries": int(held_out.frame["query_id"].nunique()),
            "items": int(held_out.frame["query_id"].nunique()) * len(systems), "unit": "query rankings"}


def _with_import_grades(ctx: StepContext, held_out: Any) -> Any:
    """The held-out pairs graded by their imported labels only: LLM relabels never change the test set."""
    from trainer.data import LabelledPairs

    truth = ctx.store.df(IMPORT_TRUTH_SQL, {"scheme": ctx.config.scheme, "dataset": ctx.config.dataset})
    frame = held_out.frame.drop(columns=["label", "grade"]).merge(truth[["pair_id", "label", "grade"]], on="pair_id")
    frame["grade"] = frame["grade"].astype(int)
    return LabelledPairs(held_out.scheme, frame)


def step_promote(ctx: StepContext) -> dict[str, Any]:
    """Promote the newest trained model if it beats the promoted one (else zero-shot) on held-out NDCG@10."""
    from trainer.registry import DEFAULT_METRIC, compare_models, ensure_zero_shot, promote, promoted_model

    evaluated = ctx.output("evaluate")["models"]
    candidate = evaluated.get("stage2") or evaluated["stage1"]
    baseline = promoted_model(ctx.store) or ensure_zero_shot(ctx.store)
    metric = str(ctx.options.get("metric", DEFAULT_METRIC))
    min_gain = float(ctx.options.get("min_gain", 0.0))
    if candidate == baseline:
        return {"candidate": candidate, "baseline": baseline, "promoted": False, "reason": "already promoted"}
    better = compare_models(ctx.store, candidate, baseline, metric, min_gain)
    if better:
        promote(ctx.store, candidate)
    return {"candidate": candidate, "baseline": baseline, "metric": metric, "min_gain": min_gain, "promoted": better,
            "promoted_model": candidate if better else baseline,
            "reason": f"{candidate} {'beats' if better else 'does not beat'} {baseline} on {metric} by more than {min_gain}"}


STEPS: dict[str, StepFunction] = {
    "ingest": step_ingest, "train-stage1": step_train_stage1, "mine": step_mine, "relabel": step_relabel,
    "engagement": step_engagement, "audit": step_audit, "trigger": step_trigger, "train-stage2": step_train_stage2,
    "evaluate": step_evaluate, "promote": step_promote,
}
assert tuple(STEPS) == STEP_NAMES
