"""`mnr demo`: the whole loop on an embedded default config, ending with one table of numbers.

Data: a fixed sample of the Home Depot set from ../shared/data when present (every judged pair of
`HOMEDEPOT_QUERIES` search terms drawn with seed 0), else the generated catalog of
`labelstore.catalog`, whose ESCI labels are known by construction. Models: SmolLM2-135M-Instruct on
the in-process vLLM engine (pulled into the cache on first use) and all-MiniLM-L6-v2.
Everything is written under the workspace folder (default ./demo-workspace/): the store
`mnr.duckdb`, models, the data sample, the audit report and `demo.log`, which gets the libraries'
output (model conversion, engine logs, progress bars) unless `mnr --verbose demo` shows it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from app.context import chatter_to_log, state
from app.loop import STEP_NAMES, LoopConfig, LoopResult, latest_loop_run, loop_summary, run_loop, step_statuses
from labelstore.paths import shared_data_dir
from labelstore.runtime import apply_engine_env_defaults
from labelstore.sqlfiles import sql
from labelstore.store import Store

STORE_FILE = "mnr.duckdb"
LOG_FILE = "demo.log"
# Sized so the whole demo stays under 10 minutes on a 2-core CPU (see the README, "mnr demo", for timings).
HOMEDEPOT_QUERIES = {False: 300, True: 120}
CATALOG_FAMILIES = {False: 14, True: 8}
RELABEL_PAIRS = {False: 200, True: 80}
TRAIN_STEPS = {False: 40, True: 20}
# The finetune step's wall-clock budget (minutes) and settings, chosen so the adapter is not degenerate
# within the 10 minutes of the demo (docs/loop.md, "mnr demo", has the measurements).
FINETUNE_MINUTES = {False: 3.0, True: 1.5}
FINETUNE = {"sources": ["human", "import"], "train_top_k": 4, "batch_size": 16, "eval_every": 10, "patience": 4,
            "max_epochs": 4.0, "warmup_steps": 5, "learning_rate": 1e-3, "class_weighting": "balanced",
            "max_dev": 150, "heldout_pairs": 200,
            # the demo's short budget on a shared CPU fits a few steps; refuse only one that fits fewer
            "min_steps": 3}
# A labeler that answers one label for more than this share of the relabelled pairs is reported as degenerate.
DEGENERATE_SHARE = 0.9


def demo_data(quick: bool) -> dict[str, Any]:
    """The [loop] keys that choose the data: Home Depot sample when ../shared/data has it, else the catalog."""
    shared = shared_data_dir()
    homedepot = shared / "homedepot" / "train.csv" if shared else None
    if homedepot is not None and homedepot.is_file():
        return {"dataset": "homedepot", "scheme": "graded3", "policy": "home-improvement",
                "ingest": {"source": "file", "path": str(homedepot), "preset": "homedepot",
                           "sample_queries": HOMEDEPOT_QUERIES[quick], "seed": 0}}
    return {"dataset": "synthetic", "scheme": "esci", "policy": "esci",
            "ingest": {"source": "catalog", "n_families": CATALOG_FAMILIES[quick], "seed": 0}}


def demo_config(workspace: Path, quick: bool = False, adapter: Path | None = None) -> LoopConfig:
    """The demo's loop config (the same keys as mnr.example.toml)."""
    data = demo_data(quick)
    loop: dict[str, Any] = {
        "workspace": str(workspace), "dataset": data["dataset"], "scheme": data["scheme"],
        "holdout_fraction": 0.2, "seed": 0,
        "ingest": data["ingest"],
        "train_stage1": {"epochs": 2, "queries_per_batch": 16, "products_per_query": 8, "max_seq_length": 32,
                         "max_steps": TRAIN_STEPS[quick]},
        "mine": {"top_k": 30, "per_query": 3},
        # Home Depot's ratings and the catalog's labels stand in for the human labels of a real team.
        "finetune": {**FINETUNE, "max_minutes": FINETUNE_MINUTES[quick]},
        "relabel": {"backend": "vllm", "model": "smollm2", "policy": data["policy"],
                    "max_pairs": RELABEL_PAIRS[quick], **({"adapter": str(adapter.resolve())} if adapter else {})},
        "engagement": {"source": "simulate", "n_sessions": 4000 if quick else 10000, "seed": 0},
        "audit": {},
        "trigger": {},
        "train_stage2": {"epochs": 2, "queries_per_batch": 16, "products_per_query": 8, "max_seq_length": 32,
                         "max_steps": TRAIN_STEPS[quick]},
        "evaluate": {"k": 100, "bm25": True},
        "promote": {"min_gain": 0.0},
    }
    # The demo's sample is small: refine once a hundred new clean labels arrived (default 500).
    whole = {"loop": loop, "trigger": {"min_new_clean_labels": 50 if quick else 100}}
    return LoopConfig(loop=loop, source_path=None, whole=whole)


def run_demo(workspace: Path, quick: bool = False, fresh: bool = False, adapter: Path | None = None,
             console: Console | None = None) -> str:
    """Run (or continue) the demo loop in `workspace`, print the summary table; returns the loop run id."""
    console = console or Console()
    apply_engine_env_defaults()
    workspace = Path(workspace)
    store_file = workspace / STORE_FILE
    store = Store(store_file)
    latest = latest_loop_run(store)
    if latest is not None and latest[1] == "ok" and not fresh:
        console.print(f"The demo loop already finished in {store_file} (run `mnr demo --fresh` to run it again, "
                      f"`make clean-demo` to start over). Its numbers:")
        print_summary(store, latest[0], workspace, console)
        return latest[0]
    config = demo_config(workspace, quick, adapter)
    console.print(f"mine-refine demo: data = {config.dataset} ({config.scheme}), store = {store_file}")
    if not state.verbose:
        console.print(f"library output (model conversion, engine logs) goes to {workspace / LOG_FILE}; "
                      "`mnr --verbose demo` shows it here")
    started = time.perf_counter()
    hint = f"mnr demo --workspace {workspace}" + (" --quick" if quick else "")
    result = _run_demo_loop(store, config, fresh, hint, workspace / LOG_FILE, console)
    console.print(f"demo loop finished in {time.perf_counter() - started:.0f} s")
    print_summary(store, result.loop_run_id, workspace, console)
    return result.loop_run_id


def _run_demo_loop(store: Store, config: LoopConfig, fresh: bool, hint: str, log_file: Path,
                   console: Console) -> LoopResult:
    """The loop with one line per step; the libraries' output goes to `log_file` unless --verbose."""
    def log(line: str) -> None:
        console.print(escape(line))

    if state.verbose:
        return run_loop(store, config, fresh=fresh, log=log, resume_hint=hint)
    with chatter_to_log(log_file, console):
        return run_loop(store, config, fresh=fresh, log=log, resume_hint=hint,
                        status=lambda name: console.status(escape(f"[{name}] running"), spinner="dots"))


# -- the summary ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def steps_table(store: Store, loop_run_id: str) -> Table:
    outputs = loop_summary(store, loop_run_id)
    statuses = step_statuses(store, loop_run_id)
    table = Table("step", "status", "wall s", "items", "items/s", "note", title="Loop steps (throughput)")
    for step in STEP_NAMES:
        out = outputs.get(step, {})
        items = out.get("items")
        unit = out.get("unit", "")
        note = "skipped" if out.get("skipped") else _step_note(step, out)
        table.add_row(step, statuses.get(step, "not run"), _fmt(out.get("wall_s")),
                      f"{_fmt(items)} {unit}".strip() if items is not None else "-",
                      _fmt(out.get("items_per_s")), escape(str(note or "")))
    return table


def _step_note(step: str, out: dict[str, Any]) -> str:
    """A few words per step; the full outputs are in the step run's metrics (`mnr status --json`)."""
    if step == "ingest":
        return f"{out.get('pairs', 0):,} pairs of {out.get('dataset')}"
    if step in ("train-stage1", "train-stage2"):
        return f"{out.get('steps')} steps"
    if step == "mine":
        return f"{out.get('candidates', 0):,} candidates, {out.get('new_pairs', 0):,} new pairs"
    if step == "finetune":
        if out.get("reused"):
            return f"reused {Path(out['adapter']).name}"
        return f"{out.get('steps')} steps, {out.get('epochs')} epochs over {out.get('train_pairs', 0):,} pairs"
    if step == "relabel":
        counts = ", ".join(f"{k} {v}" for k, v in out.get("label_counts", {}).items())
        return f"LLM {out.get('llm_pairs_per_s')} pairs/s; {counts}"
    if step == "engagement":
        return "SIMULATED" if out.get("simulated") else "real log"
    if step == "audit":
        return f"{out.get('flags', 0)} flags"
    if step == "trigger":
        return "refine" if out.get("refine") else "hold"
    if step == "promote":
        return f"promoted {out.get('candidate')}" if out.get("promoted") else f"kept {out.get('baseline')}"
    return ""


def labels_table(store: Store) -> Table:
    table = Table("source", "labels written", "pairs", title="Labels by source (whole store)")
    for source, labels, pairs in store.fetchall(sql("app.loop", "labels_by_source")):
        table.add_row(source, f"{labels:,}", f"{pairs:,}")
    return table


def retrieval_table(outputs: dict[str, dict[str, Any]]) -> Table:
    metrics = outputs.get("evaluate", {}).get("metrics", {})
    held_out = outputs.get("evaluate", {}).get("held_out_queries")
    table = Table("retriever", "NDCG@10", "recall@100", "MRR",
                  title=f"Retrieval on {held_out or '?'} held-out queries (graded qrels)")
    for system in ("bm25", "zero-shot", "stage1", "stage2", "promoted"):
        if system in metrics:
            row = metrics[system]
            table.add_row(system, _fmt(row.get("ndcg@10"), 4), _fmt(row.get("recall@100"), 4), _fmt(row.get("mrr"), 4))
    return table


def relabel_table(label_counts: dict[str, int]) -> Table:
    """How the relabel step's LLM labelled the mined pairs, with each label's share."""
    total = sum(label_counts.values())
    table = Table("label", "pairs", "share", title=f"Relabelled pairs by LLM label ({total:,} pairs)")
    for label, count in sorted(label_counts.items(), key=lambda item: -item[1]):
        table.add_row(escape(label), f"{count:,}", f"{count / total:.0%}" if total else "-")
    return table


BASE_MODEL_HINT = "try a fine-tuned adapter ([loop.finetune], or `mnr finetune` then `mnr demo --adapter`) or a larger model"
ADAPTER_HINT = "give the finetune step more labels or more time ([loop.finetune] sources, max_minutes)"


def degenerate_warning(label_counts: dict[str, int], max_share: float = DEGENERATE_SHARE,
                       hint: str = BASE_MODEL_HINT) -> str | None:
    """A warning when one label has more than `max_share` of the relabelled pairs, else None."""
    total = sum(label_counts.values())
    if total == 0:
        return None
    label, count = max(label_counts.items(), key=lambda item: item[1])
    if count / total <= max_share:
        return None
    return (f"degenerate labeler: it answered '{label}' for {count / total:.0%} of the {total:,} relabelled pairs "
            f"(more than {max_share:.0%}); its labels carry little information; {hint}")


def agreement_table(relabel: dict[str, Any], train_pairs: int | None) -> Table | None:
    """The relabel step's labeler and the text baseline against the held-out labels, on the same pairs."""
    heldout = relabel.get("heldout")
    if not heldout:
        return None
    table = Table("labeler", "QWK", "accuracy", "macro-F1",
                  title=f"Labeler agreement on {heldout['n']:,} held-out pairs ({heldout['queries']:,} queries, "
                        "none of them trained on)")
    model, _, adapter = _labeler_name(relabel).partition("+")
    trained_on = f", {train_pairs:,} training pairs" if train_pairs else ""
    llm = f"{model} (base model)" if adapter in ("", "base") else f"{model} + adapter{trained_on}"
    for name, key in ((llm, "labeler"),
                      ("text baseline (TF-IDF + linear, same labels)", "baseline")):
        row = heldout[key]
        table.add_row(escape(name), _fmt(row["qwk"], 3), _fmt(row["accuracy"], 3), _fmt(row["macro_f1"], 3))
    return table


def _labeler_name(relabel: dict[str, Any]) -> str:
    """`<model>+<adapter tag>` of the relabel step's author."""
    return str(relabel.get("author", "?")).split("@")[0]


def print_relabel_summary(outputs: dict[str, dict[str, Any]], console: Console) -> None:
    """The labeler's held-out agreement beside the baseline's, then the relabelled pairs' labels."""
    relabel = outputs.get("relabel", {})
    agreement = agreement_table(relabel, outputs.get("finetune", {}).get("train_pairs"))
    if agreement is not None:
        console.print(agreement)
        heldout = relabel["heldout"]
        console.print(f"labeler held-out QWK {heldout['labeler']['qwk']:.3f} vs text baseline "
                      f"{heldout['baseline']['qwk']:.3f} on the same {heldout['n']:,} pairs", highlight=False)
    counts = {str(k): int(v) for k, v in relabel.get("label_counts", {}).items()}
    if not counts:
        return
    console.print(relabel_table(counts))
    hint = BASE_MODEL_HINT if _labeler_name(relabel).endswith("+base") else ADAPTER_HINT
    warning = degenerate_warning(counts, hint=hint)
    if warning:
        console.print(f"[bold red]warning:[/] [red]{escape(warning)}[/]", highlight=False)


def print_summary(store: Store, loop_run_id: str, workspace: Path, console: Console) -> None:
    """The demo's closing table: steps with throughput, labels by source, flags, NDCG@10, report, review."""
    outputs = loop_summary(store, loop_run_id)
    console.print(steps_table(store, loop_run_id))
    console.print(labels_table(store))
    print_relabel_summary(outputs, console)
    audit = outputs.get("audit", {})
    flags = Table("flags raised", "pairs flagged", "by kind", "queued for review",
                  title="Audit" + (" (engagement is SIMULATED)" if audit.get("simulated") else ""))
    flags.add_row(_fmt(audit.get("flags")), _fmt(audit.get("flagged_pairs")),
                  escape(", ".join(f"{k}: {v}" for k, v in audit.get("flags_by_kind", {}).items()) or "-"),
                  _fmt(audit.get("queued")))
    console.print(flags)
    console.print(retrieval_table(outputs))
    trigger = outputs.get("trigger", {})
    if trigger:
        console.print(escape("retrain trigger: " + "; ".join(trigger.get("reasons", []))))
    promote = outputs.get("promote", {})
    if promote:
        console.print(f"promoted retriever: {escape(str(promote.get('promoted_model')))} ({escape(str(promote.get('reason')))})")
    if audit.get("report"):
        console.print(f"audit report: {audit['report']}")
    console.print(f"review the flagged pairs: mnr --store {workspace / STORE_FILE} review")
