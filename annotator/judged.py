"""Judged examples: what people already decided for the same query, shown to the labeler in its prompt.

Teams label some pairs of every query and let the labeler finish the rest (the random-pair protocol). The
labels people gave the query's other products are then strong evidence for a new one: the labels of the
query's judged pairs nearest to it, alone, with no model, nearly match TF-IDF + linear on the random splits
(`python -m bench.bench_stack_inputs`, bench/RESULTS.md), and carry what the fine-tuned LLM learns slowest.

So an adapter may be trained and served with them in its pair part (`annotator.pair_form`, short form):
how many of the query's judged pairs carry each label, and the labels of the ``k`` judged titles nearest to
this one, the nearest first. Labels only, no titles: a title costs 10-15 tokens and the order already
says which is nearest (with three titles a CrowdFlower pair part grew from 42 to 114 tokens; with labels
only it grows to 79). Nearness is word overlap (Jaccard over lower-case word sets), with no fitted
model, so every backend and every store reproduces it; ties go to the smaller pair id. A pair never sees
its own label. Queries match by their text, lower-cased, spaces collapsed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from annotator.word_match import words
from labelstore.ids import stable_hash


JUDGED_COUNTS = ("always", "beyond_k")  # when the label counts line is shown (`JudgedSettings.counts`)


@dataclass(frozen=True)
class Judged:
    """The judged examples of one pair: ``counts`` (label, number of the query's judged pairs with it) in
    scheme order, and ``nearest``: the labels of the judged titles nearest to the pair's, nearest first."""

    counts: tuple[tuple[str, int], ...]  # empty where `JudgedSettings.counts` "beyond_k" shows none
    nearest: tuple[str, ...]


@dataclass(frozen=True)
class JudgedSettings:
    """How an adapter shows judged examples; kept in its ``meta.json`` under ``"judged"``.

    k : labels of the nearest judged titles shown.
    skip_share : share of *training* pairs shown none, drawn by pair id, so the adapter also labels queries
        nobody has judged yet (new queries, query-disjoint data).
    sources : label sources the examples come from at labelling time (as the adapter was trained on).
    counts : "always": the label counts of the query's judged pairs on every pair that has examples;
        "beyond_k": only where the query has more judged pairs than ``k``, since otherwise the nearest line
        lists them all. Home Depot queries have about 4 judged pairs, so for 74% of its pairs the counts line
        (about 17 of 70 pair-part tokens) said nothing new.
    """

    k: int = 5
    skip_share: float = 0.2
    sources: tuple[str, ...] = ("human", "import")
    counts: str = "always"

    def record(self) -> dict[str, Any]:
        return {"k": self.k, "skip_share": self.skip_share, "sources": list(self.sources), "counts": self.counts}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "JudgedSettings | None":
        """The settings an adapter's ``meta.json`` records, or None when it was trained without examples."""
        record = meta.get("judged")
        if not record:
            return None
        return cls(k=int(record["k"]), skip_share=float(record.get("skip_share", 0.0)),
                   sources=tuple(record.get("sources", cls.sources)), counts=str(record.get("counts", "always")))


def query_key(query: Any) -> str:
    return " ".join(str(query).lower().split())


def _words(title: Any) -> frozenset[str]:
    return frozenset(words(title))


def skipped(pair_id: str, share: float, seed: int = 0) -> bool:
    """Whether a training pair is shown no examples: a stable draw from its id, so caches and resumes agree."""
    return share > 0 and int(stable_hash(str(seed), str(pair_id), length=8), 16) / 16**8 < share


def judged_examples(pairs: pd.DataFrame, pool: pd.DataFrame, label_names: Sequence[str], *, k: int,
                    skip_share: float = 0.0, seed: int = 0, counts: str = "always") -> list[Judged | None]:
    """The judged examples of each row of ``pairs`` (columns pair_id, query, title), drawn from ``pool``
    (columns pair_id, query, title, label: judged pairs, labels among ``label_names``); ``counts`` as
    `JudgedSettings.counts` ("beyond_k": no counts where the query's judged pairs are at most ``k``).

    Returns one entry per row, in order: None where the query has no judged pair but the row itself, or where
    the row is drawn into ``skip_share`` (`skipped`; for training pairs only).
    """
    if counts not in JUDGED_COUNTS:
        raise ValueError(f"unknown judged counts '{counts}' (use {', '.join(JUDGED_COUNTS)})")
    unknown = sorted(set(pool["label"]) - set(label_names))
    if unknown:
        raise ValueError(f"judged pairs carry labels {', '.join(map(str, unknown))} outside {', '.join(label_names)}")
    by_query: dict[str, list[tuple[str, frozenset[str], str]]] = {}
    for row in pool.itertuples(index=False):
        title = "" if pd.isna(row.title) else str(row.title)
        by_query.setdefault(query_key(row.query), []).append((str(row.pair_id), _words(title), str(row.label)))
    examples: list[Judged | None] = []
    for row in pairs.itertuples(index=False):
        pair_id = str(row.pair_id)
        others = [entry for entry in by_query.get(query_key(row.query), ()) if entry[0] != pair_id]
        if not others or skipped(pair_id, skip_share, seed):
            examples.append(None)
            continue
        words = _words(row.title)
        ranked = sorted(others, key=lambda e: (-len(words & e[1]) / max(1, len(words | e[1])), e[0]))[:k]
        shown = counts == "always" or len(others) > k
        label_counts = tuple((name, sum(entry[2] == name for entry in others)) for name in label_names) if shown else ()
        examples.append(Judged(counts=label_counts, nearest=tuple(entry[2] for entry in ranked)))
    return examples
