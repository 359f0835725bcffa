"""Run every `bench/bench_*.py`, then write `bench/RESULTS.md` from `bench/results/*.json`.

    python -m bench.run_all [--quick] [--only a,b] [--table-only] [--timeout SECONDS]

Each script runs as its own process (`python -m bench.bench_<name>`), so one crash or hang does not
stop the others. The table is built from whatever JSON files exist, and tolerates scripts that write
fewer keys than bench/README.md asks for.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
REPO_ROOT = BENCH_DIR.parent


# How to read every figure; said once here rather than beside each number.
CAVEATS = [
    "How to read these numbers:",
    "",
    "- Machine: 2 CPU cores, no GPU. Runs that do not name the CPU in their `device` (the Runs table) were made on",
    "  an AMD EPYC with AVX2 and no native bf16, where vLLM runs float32. Runs that name it say so: those of",
    "  2026-12-05 ran on an Intel Xeon with AVX-512 and AMX-BF16, faster per core, where fine-tuning trains in",
    "  bfloat16 (`--compute-dtype auto`); those of 2026-12-06 on an AMD EPYC with AVX-512 and AVX512-BF16 (no AMX),",
    "  also bfloat16, caching at half the Xeon's pace. Compare timings within a run.",
    "- Timings: some runs had the machine to themselves, others shared it with up to seven jobs (load average",
    "  5-20), which makes absolute timings pessimistic. Ratios (speed-ups, x faster) are always taken within one",
    "  run, against a baseline measured in that run. The docs page of each area says which runs were idle.",
    "- Engagement: no real logs exist here; figures derived from engagement are *simulated* and marked so.",
    "- Targets: a target not met is reported as not met.",
]


@dataclass
class ScriptOutcome:
    """One script's run: its name, exit code (None: not run this time), wall seconds, last error line."""

    name: str
    returncode: int | None
    wall_s: float
    error: str = ""


def discover(only: list[str] | None = None) -> list[str]:
    """Names <name> of every bench/bench_<name>.py, sorted; `only` keeps those listed."""
    names = sorted(path.stem.removeprefix("bench_") for path in BENCH_DIR.glob("bench_*.py"))
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"bench.run_all: no bench/bench_<name>.py for: {', '.join(unknown)} "
                             f"(have: {', '.join(names) or 'none'})")
        names = [name for name in names if name in only]
    return names


def run_script(name: str, quick: bool, timeout_s: float) -> ScriptOutcome:
    command = [sys.executable, "-m", f"bench.bench_{name}"] + (["--quick"] if quick else [])
    print(f"== bench {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    try:
        process = subprocess.run(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ScriptOutcome(name, -1, time.perf_counter() - started, f"timed out after {timeout_s:.0f}s")
    wall = time.perf_counter() - started
    sys.stderr.write(process.stderr[-4000:])
    last_line = next((line for line in reversed(process.stderr.splitlines()) if line.strip()), "")
    return ScriptOutcome(name, process.returncode, wall, last_line if process.returncode else "")


def load_results() -> dict[str, dict[str, Any]]:
    """Every bench/results/*.json by file stem; unreadable files become {'error': ...}."""
    results: dict[str, dict[str, Any]] = {}
    for path in sorted(RESULTS_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            results[path.stem] = data if isinstance(data, dict) else {"error": "not a JSON object"}
        except (OSError, json.JSONDecodeError) as exc:
            results[path.stem] = {"error": f"unreadable: {exc}"}
    return results


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _command(name: str, data: dict[str, Any]) -> str:
    return str(data.get("command") or f"python -m bench.bench_{name}" + (" --quick" if data.get("quick") else ""))


def results_table(results: dict[str, dict[str, Any]], outcomes: dict[str, ScriptOutcome]) -> str:
    """RESULTS.md text: one row per figure (figure, value, unit, target, anchor, command)."""
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench.run_all`) from `bench/results/*.json`; see bench/README.md.",
        "",
        *CAVEATS,
        "",
        "| benchmark | figure | value | unit | target | public anchor | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(set(results) | set(outcomes)):
        data = results.get(name, {})
        outcome = outcomes.get(name)
        command = f"`{_command(name, data)}`"
        if outcome is not None and outcome.returncode not in (0, None):
            lines.append(f"| {name} | **failed** (exit {outcome.returncode}) | | | | {_cell(outcome.error)} | {command} |")
            continue
        if "error" in data:
            lines.append(f"| {name} | **unreadable result** | | | | {_cell(data['error'])} | {command} |")
            continue
        if data.get("skipped"):
            lines.append(f"| {name} | skipped | | | | {_cell(data['skipped'])} | {command} |")
            continue
        figures = data.get("figures")
        if not isinstance(figures, list) or not figures:
            lines.append(f"| {name} | (no `figures` list in results/{name}.json) | | | | | {command} |")
            continue
        simulated = " *simulated*" if data.get("simulated") else ""
        for figure in figures:
            if not isinstance(figure, dict):
                continue
            lines.append(
                f"| {name} | {_cell(figure.get('name', '?'))}{simulated} | {_cell(figure.get('value'))} | "
                f"{_cell(figure.get('unit'))} | {_cell(figure.get('target'))} | {_cell(figure.get('anchor'))} | {command} |"
            )
    return "\n".join(lines + runs_table(results)) + "\n"


def runs_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """What each benchmark ran on: its data, device and command, from the same JSON files."""
    lines = ["", "## Runs", "", "| benchmark | data | device | command |", "|---|---|---|---|"]
    for name, data in sorted(results.items()):
        if "error" not in data:
            lines.append(f"| {name} | {_cell(data.get('data'))} | {_cell(data.get('device'))} | `{_command(name, data)}` |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", default="", help="comma-separated script names (bench_<name>.py)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild RESULTS.md from results/*.json")
    parser.add_argument("--timeout", type=float, default=14400.0,
                        help="seconds per script (default 14400: the full Stage 2 ablation takes about three hours)")
    args = parser.parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, ScriptOutcome] = {}
    if not args.table_only:
        only = [name.strip() for name in args.only.split(",") if name.strip()] or None
        for name in discover(only):
            outcome = run_script(name, args.quick, args.timeout)
            outcomes[name] = outcome
            state = "ok" if outcome.returncode == 0 else f"FAILED ({outcome.error})"
            print(f"== bench {name}: {state} in {outcome.wall_s:.1f}s", flush=True)
    RESULTS_MD.write_text(results_table(load_results(), outcomes), encoding="utf-8")
    print(f"wrote {RESULTS_MD.relative_to(REPO_ROOT)}")
    failed = [name for name, outcome in outcomes.items() if outcome.returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
