"""Agreement between annotators and the LLM, and between annotators on shared items.

Kappa is scikit-learn's `cohen_kappa_score`, quadratic-weighted when the scheme is graded
(more than two grades: a near miss costs less than a far one), unweighted otherwise. Labels are
passed in the scheme's order (most relevant first), so the weights follow the grades. Kappa is
NaN where it is undefined (fewer than two items, or a single label on both sides).

On blind-overlap items (decided by several annotators who could not see each other's labels) each
annotator and the LLM are also scored against the *consensus*: the admin's adjudicated label where
there is one, else the label most annotators gave; a tie without adjudication has no consensus.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from labelstore.schemes import LabelScheme
from labelstore.sqlfiles import sql
from labelstore.store import Store

AGREEMENT_COLUMNS = ["pair_id", "annotator", "label", "grade", "created_at", "llm_label", "llm_grade",
                     "adjudicated_label", "blind"]


def is_graded(scheme: LabelScheme) -> bool:
    return len(set(scheme.grades.values())) > 2


def decisions_frame(store: Store, scheme: LabelScheme, overlap: float = 0.0) -> pd.DataFrame:
    """Each annotator's live decision per pair with the pair's newest LLM label: columns `AGREEMENT_COLUMNS`.

    `llm_label` / `llm_grade` are null where the LLM has not labelled the pair, `adjudicated_label` where
    no admin adjudicated it; `blind` marks the items in the `overlap` share.
    """
    return store.df(sql("app.review", "agreement"), {"scheme": scheme.name, "overlap": overlap})


def kappa(labels_a: pd.Series | list[str], labels_b: pd.Series | list[str], scheme: LabelScheme) -> float:
    """Cohen's kappa of two equally long label sequences (quadratic-weighted for graded schemes)."""
    if len(labels_a) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        value = cohen_kappa_score(list(labels_a), list(labels_b), labels=scheme.label_names,
                                  weights="quadratic" if is_graded(scheme) else None)
    return float(value)


def annotator_vs_llm(decisions: pd.DataFrame, scheme: LabelScheme) -> pd.DataFrame:
    """One row per annotator: n (items the LLM also labelled), kappa, accuracy (share of equal labels)."""
    rows = []
    with_llm = decisions.dropna(subset=["llm_label"])
    for annotator, group in with_llm.groupby("annotator", sort=True):
        rows.append({"annotator": annotator, "n": len(group),
                     "kappa": kappa(group["label"], group["llm_label"], scheme),
                     "accuracy": float((group["label"] == group["llm_label"]).mean())})
    return pd.DataFrame(rows, columns=["annotator", "n", "kappa", "accuracy"])


def shared_items(decisions: pd.DataFrame) -> pd.DataFrame:
    """Annotator pairs on items both decided: columns pair_id, annotator_a, annotator_b, label_a, label_b (a < b)."""
    merged = decisions.merge(decisions, on="pair_id", suffixes=("_a", "_b"))
    merged = merged[merged["annotator_a"] < merged["annotator_b"]]
    return merged[["pair_id", "annotator_a", "annotator_b", "label_a", "label_b"]].reset_index(drop=True)


def between_annotators(decisions: pd.DataFrame, scheme: LabelScheme) -> pd.DataFrame:
    """One row per pair of annotators with shared items: n, kappa, accuracy."""
    rows = []
    for (first, second), group in shared_items(decisions).groupby(["annotator_a", "annotator_b"], sort=True):
        rows.append({"annotator_a": first, "annotator_b": second, "n": len(group),
                     "kappa": kappa(group["label_a"], group["label_b"], scheme),
                     "accuracy": float((group["label_a"] == group["label_b"]).mean())})
    return pd.DataFrame(rows, columns=["annotator_a", "annotator_b", "n", "kappa", "accuracy"])


def confusion(labels_rows: pd.Series, labels_columns: pd.Series, scheme: LabelScheme) -> pd.DataFrame:
    """Counts of (row label, column label), rows and columns in the scheme's order."""
    names = scheme.label_names
    matrix = confusion_matrix(list(labels_rows), list(labels_columns), labels=names) if len(labels_rows) \
        else np.zeros((len(names), len(names)), dtype=int)
    return pd.DataFrame(matrix, index=pd.Index(names, name="rows"), columns=names)


def kappa_trend(decisions: pd.DataFrame, scheme: LabelScheme, freq: str = "D") -> pd.DataFrame:
    """Annotator-vs-LLM kappa per period of decision time: columns period, annotator, n, kappa."""
    with_llm = decisions.dropna(subset=["llm_label"])
    if with_llm.empty:
        return pd.DataFrame(columns=["period", "annotator", "n", "kappa"])
    periods = pd.to_datetime(with_llm["created_at"]).dt.to_period(freq).dt.start_time
    rows = []
    for (period, annotator), group in with_llm.groupby([periods, "annotator"], sort=True):
        rows.append({"period": period, "annotator": annotator, "n": len(group),
                     "kappa": kappa(group["label"], group["llm_label"], scheme)})
    return pd.DataFrame(rows, columns=["period", "annotator", "n", "kappa"])



def consensus(decisions: pd.DataFrame) -> pd.DataFrame:
    """One row per blind item at least two annotators decided and that has a consensus: pair_id, consensus,
    n_annotators, llm_label. The consensus is the adjudicated label, else a strict majority-of-votes winner."""
    blind = decisions[decisions["blind"].astype(bool)]
    rows = []
    for pair_id, group in blind.groupby("pair_id", sort=True):
        if len(group) < 2:
            continue
        adjudicated = group["adjudicated_label"].dropna()
        counts = group["label"].value_counts()
        if not adjudicated.empty:
            label = adjudicated.iloc[0]
        elif len(counts) == 1 or counts.iloc[0] > counts.iloc[1]:
            label = counts.index[0]
        else:
            continue
        rows.append({"pair_id": pair_id, "consensus": label, "n_annotators": len(group),
                     "llm_label": group["llm_label"].iloc[0]})
    return pd.DataFrame(rows, columns=["pair_id", "consensus", "n_annotators", "llm_label"])


def versus_consensus(decisions: pd.DataFrame, scheme: LabelScheme) -> pd.DataFrame:
    """Kappa against the consensus on blind items: one row per annotator, and one for 'LLM' (where it labelled).
    Columns who, n, kappa, accuracy."""
    agreed = consensus(decisions)
    mine = decisions.merge(agreed[["pair_id", "consensus"]], on="pair_id")
    rows = [_score(annotator, group["label"], group["consensus"], scheme)
            for annotator, group in mine.groupby("annotator", sort=True)]
    llm = agreed.dropna(subset=["llm_label"])
    if not llm.empty:
        rows.append(_score("LLM", llm["llm_label"], llm["consensus"], scheme))
    return pd.DataFrame(rows, columns=["who", "n", "kappa", "accuracy"])


def _score(who: str, labels: pd.Series, reference: pd.Series, scheme: LabelScheme) -> dict:
    return {"who": who, "n": len(labels), "kappa": kappa(labels, reference, scheme),
            "accuracy": float((labels.to_numpy() == reference.to_numpy()).mean())}
