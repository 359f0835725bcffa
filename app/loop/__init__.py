"""The Mine and Refine loop: the runner (`runner`: plan, run, resume, record steps in the store) and
the eleven steps (`steps`: one `Step` record each). `sql/` holds the queries of both."""
from app.loop.runner import (
    LoopConfig, LoopResult, Step, StepContext, StepFailed, latest_loop_run, latest_step_outputs, loop_summary,
    plan_loop, run_loop, step_statuses, validate_config,
)
from app.loop.steps import STEP_NAMES, STEPS

__all__ = [
    "LoopConfig", "LoopResult", "Step", "StepContext", "StepFailed", "latest_loop_run", "latest_step_outputs",
    "loop_summary", "plan_loop", "run_loop", "step_statuses", "validate_config", "STEP_NAMES", "STEPS",
]
