"""The CLI boundary: `--store` on every subcommand, settings from the loop's own config, and the demo
summary's degenerate-labeler warning."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console

from app.demo import degenerate_warning, print_relabel_summary


def test_store_is_accepted_after_the_subcommand_and_wins_over_the_global_one(tmp_path: Path) -> None:
    def mnr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    assert mnr("status", "--store", "after.duckdb").returncode == 0
    assert mnr("--store", "global.duckdb", "status", "--store", "local.duckdb").returncode == 0
    assert mnr("models", "list", "--store", "nested.duckdb").returncode == 0
    assert sorted(p.name for p in tmp_path.glob("*.duckdb")) == ["after.duckdb", "local.duckdb"]


def test_a_labeler_answering_one_label_for_over_90_percent_is_reported_in_red() -> None:
    assert degenerate_warning({"Exact": 90, "Irrelevant": 10}) is None  # 90% exactly is not "more than"
    assert degenerate_warning({}) is None
    warning = degenerate_warning({"Exact": 95, "Substitute": 3, "Irrelevant": 2})
    assert warning is not None and "'Exact'" in warning and "95%" in warning

    console = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    print_relabel_summary({"relabel": {"label_counts": {"Exact": 95, "Substitute": 3, "Irrelevant": 2}}}, console)
    styled = console.export_text(styles=True, clear=False)
    text = console.export_text()
    assert "Relabelled pairs by LLM label" in text and "(100 pairs)" in text and "95%" in text and "degenerate labeler" in text
    assert "\x1b[1;31mwarning:" in styled  # bold red


def test_a_balanced_labeler_gets_the_distribution_without_a_warning() -> None:
    console = Console(record=True, width=200)
    print_relabel_summary({"relabel": {"label_counts": {"Exact": 50, "Irrelevant": 50}}}, console)
    text = console.export_text()
    assert "50%" in text and "degenerate" not in text


def test_a_step_reads_the_sections_it_declares_from_the_loops_own_config(tmp_path: Path) -> None:
    import pytest

    from app.loop import LoopConfig, Step, run_loop
    from labelstore.store import Store

    config_path = tmp_path / "other.toml"
    config_path.write_text('[loop]\nworkspace = "ws"\n[annotator]\nreview_threshold = 0.3\n', encoding="utf-8")
    seen: dict = {}

    def reads_annotator(ctx) -> dict:
        seen.update(ctx.section("annotator"))
        return {}

    def reads_undeclared(ctx) -> dict:
        return ctx.section("trigger")

    store = Store(tmp_path / "s.duckdb")
    steps = [Step("one", reads_annotator, sections=("annotator",)), Step("two", reads_undeclared)]
    with pytest.raises(Exception, match="reads \\[trigger\\] without declaring it"):
        run_loop(store, LoopConfig.from_file(config_path), steps=steps, log=lambda _line: None)
    assert seen == {"review_threshold": 0.3}


def test_the_summary_puts_the_adapters_heldout_qwk_beside_the_baselines() -> None:
    from app.demo import ADAPTER_HINT, BASE_MODEL_HINT

    heldout = {"n": 200, "queries": 41, "labeler_counts": {"relevant": 120, "partial": 50, "irrelevant": 30},
               "labeler": {"qwk": 0.4123, "accuracy": 0.61, "macro_f1": 0.48},
               "baseline": {"qwk": 0.3051, "accuracy": 0.58, "macro_f1": 0.40}}
    outputs = {"finetune": {"train_pairs": 912},
               "relabel": {"label_counts": {"relevant": 97, "irrelevant": 3}, "heldout": heldout,
                           "author": "smollm2+home-improvement-0123abcd-89abcdef@home-improvement:5f3a"}}
    console = Console(record=True, width=200)
    print_relabel_summary(outputs, console)
    text = " ".join(console.export_text().split())
    assert "labeler held-out QWK 0.412 vs text baseline 0.305 on the same 200 pairs" in text
    assert "Labeler agreement on 200 held-out pairs (41 queries" in text
    assert "smollm2 + adapter, 912 training pairs" in text
    # an adapter that still answers one label for 97% of the mined pairs stays reported as degenerate
    assert "degenerate labeler" in text and "'relevant' for 97%" in text and ADAPTER_HINT in text

    console = Console(record=True, width=200)
    print_relabel_summary({"relabel": {"label_counts": {"relevant": 200}, "author": "smollm2+base@x:1"}}, console)
    text = " ".join(console.export_text().split())
    assert "held-out QWK" not in text and BASE_MODEL_HINT in text
