"""Drift over time windows, with alarms (scipy statistics).

- label distribution per window and segment (label source) vs the segment's reference window
  (its first window with enough labels): population stability index and a chi-square test;
- LLM-human agreement per window vs the reference window;
- engagement-label consistency per window: each label's COEC vs the reference window, with a
  chi-square test of the window's clicks against those the reference COECs predict.
Each function takes a long frame from the matching SQL file and returns one row per window.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import rel_entr

from auditor.settings import AuditSettings

PSI_EPSILON = 1e-4


def population_stability_index(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI = sum_i (p_i - q_i) ln(p_i / q_i) of two count vectors of shape (n_labels,), smoothed."""
    p = (np.asarray(current, float) + PSI_EPSILON) / (np.sum(current) + PSI_EPSILON * len(current))
    q = (np.asarray(reference, float) + PSI_EPSILON) / (np.sum(reference) + PSI_EPSILON * len(reference))
    return float(np.sum(rel_entr(p, q) + rel_entr(q, p)))


def label_distribution_drift(label_windows: pd.DataFrame, settings: AuditSettings) -> pd.DataFrame:
    """Per (segment, window_start): n, psi, chi2_p, alarm, reference_window.

    label_windows: long frame (window_start, segment, label, n) from label_windows.sql.
    """
    columns = ["segment", "window_start", "n", "psi", "chi2_p", "alarm", "reference_window"]
    if label_windows.empty:
        return pd.DataFrame(columns=columns)
    wide = label_windows.pivot_table(index=["segment", "window_start"], columns="label", values="n",
                                     aggfunc="sum", fill_value=0)
    rows = []
    for segment, block in wide.groupby(level="segment"):
        block = block.droplevel("segment").sort_index()
        totals = block.sum(axis=1)
        eligible = totals[totals >= settings.drift_min_count]
        if eligible.empty:
            continue
        reference_window = eligible.index[0]
        reference = block.loc[reference_window].to_numpy()
        for window, counts in block.iterrows():
            current = counts.to_numpy()
            enough = current.sum() >= settings.drift_min_count
            psi = population_stability_index(reference, current) if enough else np.nan
            p_value = _chi2_p(reference, current) if enough and window != reference_window else np.nan
            alarm = bool(enough and window != reference_window and psi > settings.psi_alarm
                         and p_value < settings.chi2_alpha)
            rows.append({"segment": segment, "window_start": window, "n": int(current.sum()), "psi": psi,
                         "chi2_p": p_value, "alarm": alarm, "reference_window": reference_window})
    return pd.DataFrame(rows, columns=columns)


def _chi2_p(reference: np.ndarray, current: np.ndarray) -> float:
    table = np.vstack([reference, current])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(stats.chi2_contingency(table).pvalue)


def agreement_drift(llm_human: pd.DataFrame, settings: AuditSettings) -> pd.DataFrame:
    """Per window_start: n pairs with both labels, agreement (share with equal grades), alarm.

    llm_human: one row per pair (window_start, human_grade, llm_grade) from llm_human.sql.
    """
    columns = ["window_start", "n", "agreement", "alarm", "reference_agreement"]
    if llm_human.empty:
        return pd.DataFrame(columns=columns)
    frame = llm_human.assign(agree=(llm_human["human_grade"] == llm_human["llm_grade"]).astype(float))
    per_window = frame.groupby("window_start")["agree"].agg(["count", "mean"]).sort_index()
    eligible = per_window[per_window["count"] >= settings.drift_min_count]
    reference = float(eligible["mean"].iloc[0]) if not eligible.empty else np.nan
    rows = []
    for window, row in per_window.iterrows():
        enough = row["count"] >= settings.drift_min_count
        alarm = bool(enough and not np.isnan(reference) and row["mean"] < reference - settings.agreement_drop)
        rows.append({"window_start": window, "n": int(row["count"]), "agreement": float(row["mean"]),
                     "alarm": alarm, "reference_agreement": reference})
    return pd.DataFrame(rows, columns=columns)


def engagement_drift(windows: pd.DataFrame, settings: AuditSettings) -> pd.DataFrame:
    """Per window_start: the largest |log(COEC / reference COEC)| over labels, a chi-square p-value, alarm.

    windows: long frame (window_start, grade, label, clicks, expected_clicks, coec) from
        engagement_windows.sql. The reference window is the first with every label well observed;
        a label is tested in a window when its reference COEC predicts at least drift_min_count clicks there.
    """
    columns = ["window_start", "max_log_coec_change", "chi2_p", "alarm", "labels_tested", "simulated"]
    if windows.empty:
        return pd.DataFrame(columns=columns)
    observed = windows[windows["expected_clicks"] >= settings.drift_min_count]
    per_window = observed.groupby("window_start")["grade"].nunique()
    full = per_window[per_window == per_window.max()]
    if full.empty:
        return pd.DataFrame(columns=columns)
    reference_window = full.index.min()
    reference = observed[observed["window_start"] == reference_window].set_index("grade")["coec"]
    rows = []
    for window, block in observed.groupby("window_start"):
        block = block[block["grade"].isin(reference.index)]
        # a label is tested only where the reference rates predict enough clicks
        block = block[block["expected_clicks"].to_numpy() * reference.loc[block["grade"]].to_numpy()
                      >= settings.drift_min_count]
        ref = reference.loc[block["grade"]].to_numpy()
        predicted = block["expected_clicks"].to_numpy() * ref
        clicks = block["clicks"].to_numpy()
        change = np.abs(np.log(np.maximum(block["coec"].to_numpy(), 1e-3) / np.maximum(ref, 1e-3)))
        statistic = float(np.sum((clicks - predicted) ** 2 / np.maximum(predicted, 1e-9)))
        p_value = float(stats.chi2.sf(statistic, df=max(len(block) - 1, 1))) if window != reference_window else np.nan
        max_change = float(change.max()) if len(change) else np.nan
        alarm = bool(window != reference_window and len(block) >= 2 and max_change > settings.coec_change
                     and p_value < settings.chi2_alpha)
        rows.append({"window_start": window, "max_log_coec_change": max_change, "chi2_p": p_value, "alarm": alarm,
                     "labels_tested": int(len(block)), "simulated": bool(block["simulated"].any())})
    return pd.DataFrame(rows, columns=columns)
