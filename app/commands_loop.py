"""`mnr run` (the loop from a config file) and `mnr demo` (the loop on an embedded default)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from app.context import console, state
from app.loop import STEP_NAMES, LoopConfig, run_loop
from labelstore import Store
from labelstore.config import DEFAULT_STORE

_STEPS_HELP = ", ".join(STEP_NAMES)


def run(
    config: Path = typer.Option(Path("mnr.toml"), "--config", "-c", help="Config file with a \\[loop] section."),
    from_step: Optional[str] = typer.Option(None, "--from", help=f"Re-run this step and every later one ({_STEPS_HELP})."),
    only_step: Optional[str] = typer.Option(None, "--only", help="Re-run just this step."),
    fresh: bool = typer.Option(False, "--fresh", help="Start a new loop run instead of continuing the latest."),
) -> None:
    """Run the Mine and Refine loop: ingest, train-stage1, mine, finetune, relabel, engagement, audit, trigger,
    train-stage2, evaluate, promote. Each step is recorded as a run; a re-run continues at the failed step."""
    loop_config = LoopConfig.from_file(config)
    # --store / MNR_STORE win; otherwise the [store] path of *this* config file.
    path = state.store or os.environ.get("MNR_STORE") or str(loop_config.resolve(
        str(loop_config.whole.get("store", {}).get("path", DEFAULT_STORE))))
    store = Store(path)
    hint = f"mnr --store {path} run --config {config}"
    result = run_loop(store, loop_config, from_step=from_step, only_step=only_step, fresh=fresh,
                      log=lambda line: console.print(escape(line)), resume_hint=hint)
    console.print(f"loop {result.loop_run_id}: ran {', '.join(result.ran)}; `mnr --store {path} status` shows the runs")


def demo(
    workspace: Path = typer.Option(Path("demo-workspace"), "--workspace", help="Folder for the demo store, models and report."),
    quick: bool = typer.Option(False, "--quick", help="A smaller sample and fewer training steps (about half the time)."),
    fresh: bool = typer.Option(False, "--fresh", help="Run a new loop even when the last demo loop finished."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter from `mnr finetune` for the "
                                           "relabel step (default: the base SmolLM2)."),
) -> None:
    """The whole loop on a small default: Home Depot sample from ../shared/data, else a generated catalog."""
    from app.demo import run_demo

    run_demo(workspace, quick=quick, fresh=fresh, adapter=adapter, console=console)


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""
    app.command(name="run")(run)
    app.command()(demo)

