"""The Mine and Refine loop machinery: named, resumable steps recorded in the store.

A *loop run* is a row in `runs` with kind 'loop'. Each step it executes is a child run with kind
'loop:<step>' and `parent_run_id` = the loop run. A step returns a dict of outputs (model ids,
paths, metrics); the runner stores it, with the step's wall time and throughput, as that
child run's `metrics` JSON. Later steps, and later invocations of the loop, read earlier outputs
back from the store, never from memory, so a loop can stop anywhere and continue.

Resuming: `run_loop` continues the latest loop run at its first step whose latest attempt is not
'ok'. When the latest loop run finished every step, a new loop run starts. `from_step` re-runs a
step and everything after it; `only_step` re-runs one step; `fresh` starts a new loop run.

A step that raises stops the loop: the step run and the loop run are marked 'failed' with the
error, finished steps stay 'ok', and `StepFailed` says which step failed and how to continue.

The steps themselves are `Step` records in `app.loop.steps`.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelstore.config import load_config
from labelstore.errors import MnrError
from labelstore.sqlfiles import sql
from labelstore.store import Store

LOOP_KIND = "loop"
STEP_PREFIX = f"{LOOP_KIND}:%"
LOOP_KEYS = ("workspace", "dataset", "scheme", "holdout_fraction", "seed")


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

    def section(self, name: str) -> dict[str, Any]:
        """A top-level table of the config file (`[auditor]`, `[trigger]`, `[annotator]`), `{}` when absent."""
        value = self.whole.get(name, {})
        if not isinstance(value, dict):
            raise MnrError(f"{self.where}: [{name}] must be a table")
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
    """What a step function gets: the store, its settings from the config, and earlier steps' outputs."""

    store: Store
    config: LoopConfig
    loop_run_id: str
    step: "Step"
    run_id: str
    log: Callable[[str], None] = print

    @property
    def options(self) -> dict[str, Any]:
        """The step's `[loop.<step>]` table."""
        return self.config.options(self.step.name)

    def section(self, name: str) -> dict[str, Any]:
        """A top-level table of the loop's config file (e.g. `[auditor]`) that the step declared it reads."""
        if name not in self.step.sections:
            raise MnrError(f"step '{self.step.name}' reads [{name}] without declaring it in its Step record")
        return self.config.section(name)

    @property
    def workspace(self) -> Path:
        path = self.config.workspace
        path.mkdir(parents=True, exist_ok=True)
        return path

    def output(self, step: str) -> dict[str, Any]:
        """The outputs of `step`'s latest 'ok' run, preferring this loop run's; raise if it never ran."""
        found = latest_step_outputs(self.store, step, self.loop_run_id)
        if found is None:
            raise MnrError(f"step '{self.step.name}' needs the outputs of step '{step}', which has not finished; "
                           f"run `mnr run --from {step}`")
        return found


StepFunction = Callable[[StepContext], dict[str, Any]]


@dataclass(frozen=True)
class Step:
    """One loop step: its name, its function, the keys its `[loop.<name>]` table accepts, and the
    top-level config tables it reads (`sections`). `keys` is called only when validating a config,
    so a step's heavy imports (torch for the trainer's dataclasses) wait until then."""

    name: str
    function: StepFunction
    keys: Callable[[], set[str]] = set
    sections: tuple[str, ...] = ()

    @property
    def table(self) -> str:
        return self.name.replace("-", "_")


def latest_step_outputs(store: Store, step: str, loop_run_id: str | None = None) -> dict[str, Any] | None:
    """Outputs of the latest 'ok' run of `step`: within `loop_run_id` when it has one, else any loop's."""
    row = store.fetchall(sql("app.loop", "step_outputs"), {"kind": f"{LOOP_KIND}:{step}", "loop_run_id": loop_run_id})
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
    rows = store.fetchall(sql("app.loop", "latest_loop_run"), {"kind": LOOP_KIND})
    return (rows[0][0], rows[0][1]) if rows else None


def step_statuses(store: Store, loop_run_id: str) -> dict[str, str]:
    """Each step's latest attempt status within a loop run ('ok', 'failed', 'running'); absent: never ran."""
    rows = store.fetchall(sql("app.loop", "step_statuses"), {"loop_run_id": loop_run_id, "prefix": STEP_PREFIX})
    return {kind.split(":", 1)[1]: status for kind, status in rows}


def step_names(steps: Sequence[Step]) -> list[str]:
    return [step.name for step in steps]


def check_step(name: str | None, steps: Sequence[Step]) -> None:
    names = step_names(steps)
    if name is not None and name not in names:
        raise MnrError(f"unknown step '{name}'; the steps are: {', '.join(names)}")


def plan_loop(store: Store, *, from_step: str | None = None, only_step: str | None = None,
              fresh: bool = False, steps: Sequence[Step] | None = None) -> LoopPlan:
    """Which loop run to continue and which steps to run, in order."""
    names = step_names(default_steps(steps))
    check_step(from_step, default_steps(steps))
    check_step(only_step, default_steps(steps))
    if from_step and only_step:
        raise MnrError("give --from or --only, not both")
    latest = None if fresh else latest_loop_run(store)
    if only_step:
        return LoopPlan(latest[0] if latest else None, [only_step], f"--only {only_step}")
    if from_step:
        return LoopPlan(latest[0] if latest else None, names[names.index(from_step):], f"--from {from_step}")
    if latest is None:
        return LoopPlan(None, names, "fresh loop" if fresh else "first loop in this store")
    statuses = step_statuses(store, latest[0])
    pending = [name for name in names if statuses.get(name) != "ok"]
    if not pending:
        return LoopPlan(None, names, f"loop {latest[0]} finished; starting a new loop")
    return LoopPlan(latest[0], names[names.index(pending[0]):], f"continuing loop {latest[0]} at step '{pending[0]}'")


def default_steps(steps: Sequence[Step] | None) -> Sequence[Step]:
    """`steps`, or the loop's own eleven steps."""
    if steps is not None:
        return steps
    from app.loop.steps import STEPS  # the steps import this module: resolved at call time

    return STEPS


# -- validation ------------------------------------------------------------------------------
def validate_config(config: LoopConfig, steps: Sequence[Step] | None = None) -> None:
    """Raise one `MnrError` listing every unknown key of [loop] and its step tables."""
    steps = default_steps(steps)
    tables = [step.table for step in steps]
    problems = [f"[loop] {key}: unknown key (known: {', '.join(LOOP_KEYS)} and the step tables "
                f"{', '.join(f'[loop.{t}]' for t in tables)})"
                for key in config.loop if key not in LOOP_KEYS and key not in tables]
    for step in steps:
        known = step.keys()
        unknown = sorted(set(config.options(step.name)) - known)
        if unknown:
            problems.append(f"[loop.{step.table}]: unknown key(s) {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
    if problems:
        raise MnrError(f"{config.where}: " + "; ".join(problems))


# -- running ---------------------------------------------------------------------------------
@dataclass
class LoopResult:
    loop_run_id: str
    ran: list[str]
    outputs: dict[str, dict[str, Any]]


StepStatus = Callable[[str], AbstractContextManager[Any]]


def run_loop(store: Store, config: LoopConfig, *, from_step: str | None = None, only_step: str | None = None,
             fresh: bool = False, steps: Sequence[Step] | None = None, log: Callable[[str], None] = print,
             status: StepStatus | None = None, resume_hint: str = "mnr run") -> LoopResult:
    """Run the planned steps in order; each is a child run of the loop run. Raises `StepFailed`.

    `status(step)` is entered while a step runs (e.g. a spinner); by default it logs "[step] started".
    """
    steps = default_steps(steps)
    validate_config(config, steps)
    plan = plan_loop(store, from_step=from_step, only_step=only_step, fresh=fresh, steps=steps)
    params = {"config": config.where, "from": from_step, "only": only_step, "fresh": fresh}
    loop_run_id = store.start_run(LOOP_KIND, params, run_id=plan.loop_run_id)
    log(f"loop {loop_run_id}: {plan.reason}; steps: {', '.join(plan.steps)}")
    by_name = {step.name: step for step in steps}
    outputs: dict[str, dict[str, Any]] = {}
    for name in plan.steps:
        with (status or _log_start(log))(name):
            outputs[name] = _run_step(store, config, loop_run_id, by_name[name], log, resume_hint)
    statuses = step_statuses(store, loop_run_id)
    done = all(statuses.get(step.name) == "ok" for step in steps)
    store.finish_run(loop_run_id, "ok" if done else "partial", {"steps": statuses})
    return LoopResult(loop_run_id, plan.steps, outputs)


def _log_start(log: Callable[[str], None]) -> StepStatus:
    @contextmanager
    def started(name: str) -> Iterator[None]:
        log(f"[{name}] started")
        yield

    return started


def _run_step(store: Store, config: LoopConfig, loop_run_id: str, step: Step, log: Callable[[str], None],
              resume_hint: str) -> dict[str, Any]:
    name = step.name
    run_id = store.start_run(f"{LOOP_KIND}:{name}", config.options(name), parent_run_id=loop_run_id)
    context = StepContext(store, config, loop_run_id, step, run_id, log)
    started = time.perf_counter()
    try:
        outputs = dict(step.function(context) or {})
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
    rows = store.fetchall(sql("app.loop", "step_metrics"), {"loop_run_id": loop_run_id, "prefix": STEP_PREFIX})
    return {kind.split(":", 1)[1]: json.loads(metrics or "{}") for kind, metrics in rows}
