"""The audit report: one self-contained HTML file (plots embedded as base64 PNG) and a JSON summary."""
from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from auditor.audit import AuditResult  # noqa: E402
from auditor.settings import AuditSettings  # noqa: E402
from labelstore.store import Store  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
FLAGS_SHOWN = 200
PAIR_TEXT_SQL = """
SELECT p.pair_id, q.text AS query, pr.title
FROM pairs p JOIN queries q USING (query_id) JOIN products pr USING (product_id)
WHERE p.pair_id IN (SELECT unnest(?))
"""


def _png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _tag(simulated: bool) -> str:
    return " (simulated)" if simulated else ""


def _sample_tag(sample_modulus: int) -> str:
    return f"\n1 pair in {sample_modulus} (hash sample)" if sample_modulus > 1 else ""


def plot_ctr_by_position(curve: pd.DataFrame, simulated: bool, sample_modulus: int = 1) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if not curve.empty:
        ax.plot(curve["position"], curve["observed_ctr"], "o-", label="observed CTR")
        ax.plot(curve["position"], curve["reference_ctr"], "s--", label="reference CTR (fitted position curve)")
        ax.set_xticks(curve["position"].tolist()[:20])
    ax.set_xlabel("position shown")
    ax.set_ylabel("click-through rate")
    ax.set_title("CTR by position" + _tag(simulated) + _sample_tag(sample_modulus))
    ax.legend()
    return _png(fig)


def plot_coec_by_label(metrics: pd.DataFrame, settings: AuditSettings, simulated: bool) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    enough = metrics[(metrics["expected_clicks"] >= settings.min_expected_clicks) & metrics["grade"].notna()]
    grades = sorted(enough["grade"].unique())
    if grades:
        data = [enough.loc[enough["grade"] == g, "coec"].to_numpy() for g in grades]
        names = [str(enough.loc[enough["grade"] == g, "label"].iloc[0]) for g in grades]
        ax.boxplot(data, tick_labels=names, showfliers=True)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("COEC (clicks / expected clicks)")
    ax.set_title("COEC by current label" + _tag(simulated))
    return _png(fig)


def plot_engagement_drift(windows: pd.DataFrame, trend: pd.DataFrame, simulated: bool, sample_modulus: int = 1) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, block in windows.groupby("label"):
        ax.plot(pd.to_datetime(block["window_start"]), block["coec"], "o-", label=str(label))
    for window in trend.loc[trend["alarm"], "window_start"] if not trend.empty else []:
        ax.axvline(pd.to_datetime(window), color="#b00020", alpha=0.3, lw=6)
    ax.set_ylabel("COEC")
    ax.set_title("COEC per label over time" + _tag(simulated) + "; red: alarm" + _sample_tag(sample_modulus))
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)


def plot_label_drift(label_drift: pd.DataFrame, settings: AuditSettings) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for segment, block in label_drift.groupby("segment"):
        ax.plot(pd.to_datetime(block["window_start"]), block["psi"], "o-", label=f"source {segment}")
    ax.axhline(settings.psi_alarm, color="#b00020", ls="--", lw=1, label="alarm threshold")
    ax.set_ylabel("PSI vs reference window")
    ax.set_title("Label distribution drift")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)


def _flag_rows(store: Store, issues: pd.DataFrame) -> list[dict]:
    shown = issues.head(FLAGS_SHOWN)
    if shown.empty:
        return []
    texts = store.df(PAIR_TEXT_SQL, [shown["pair_id"].tolist()]).set_index("pair_id")
    rows = []
    for row in shown.to_dict("records"):
        extra = texts.loc[row["pair_id"]].to_dict() if row["pair_id"] in texts.index else {}
        evidence = ", ".join(f"{k}={v}" for k, v in sorted(row["evidence"].items()))
        rows.append({**row, **extra, "evidence_text": evidence})
    return rows


def write_report(store: Store, result: AuditResult, out_dir: str | Path, settings: AuditSettings) -> Path:
    """Write `out_dir/audit.html` (self-contained) and `out_dir/audit.json`; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sim, sampled = result.engagement.simulated, result.engagement.sample_modulus
    plots = {
        "ctr_by_position": plot_ctr_by_position(result.engagement.position_curve, sim, sampled),
        "coec_by_label": plot_coec_by_label(result.engagement.pair_metrics, settings, sim),
        "engagement_drift": plot_engagement_drift(result.engagement.windows, result.engagement_drift, sim, sampled),
        "label_drift": plot_label_drift(result.label_drift, settings),
    }
    flags = _flag_rows(store, result.issues)
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    html = environment.get_template("report.html.j2").render(
        s=result.summary, plots=plots, flags=flags, flags_shown=len(flags), settings=settings,
        confidence=float(2 * stats.norm.cdf(settings.z) - 1), store_path=str(store.path),
        written_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    summary = {**result.summary, "settings": asdict(settings),
               "flags_top": [{k: v for k, v in f.items() if k != "evidence_text"} for f in flags]}
    html_path = out / "audit.html"
    tmp_html, tmp_json = out / "audit.html.tmp", out / "audit.json.tmp"
    tmp_html.write_text(html, encoding="utf-8")
    tmp_json.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    tmp_html.replace(html_path)
    tmp_json.replace(out / "audit.json")
    return html_path
