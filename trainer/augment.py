"""Robustness augmentation: spelling noise for queries, and writing synthetic queries to the store.

Spelling noise applies, at each letter with probability `rate`, one of: swap with the next
character, deletion, insertion of a keyboard neighbour, or substitution by a keyboard neighbour
(QWERTY). The random stream of a query depends only on (seed, copy, query text), so the result
is deterministic and independent of the order queries are processed in.

Generated queries (from product titles, by an LLM at `app` level) are written here too, so both
kinds land in the store the same way: `queries.synthetic = true`, origin 'synthetic'.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from labelstore import ids
from labelstore.errors import MnrError
from labelstore.store import PAIR_COLUMNS, QUERY_COLUMNS, LabelRecord, Store, insert_new

KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
EDITS = ("swap", "delete", "insert", "substitute")
AUGMENT_AUTHOR = "augment:spelling-noise"

# Current labels of a dataset's non-synthetic queries, to copy onto their noisy variants.
SOURCE_LABELS_SQL = """
SELECT q.query_id, q.text, p.product_id, c.scheme, c.label, c.grade
FROM current_labels c
JOIN pairs p ON p.pair_id = c.pair_id
JOIN queries q ON q.query_id = p.query_id
WHERE q.dataset = $dataset AND NOT q.synthetic AND ($scheme IS NULL OR c.scheme = $scheme)
ORDER BY q.query_id, p.product_id
"""


def _neighbours() -> dict[str, str]:
    grid = {ch: (r, c) for r, row in enumerate(KEYBOARD_ROWS) for c, ch in enumerate(row)}
    near: dict[str, str] = {}
    for ch, (r, c) in grid.items():
        near[ch] = "".join(other for other, (r2, c2) in grid.items()
                           if other != ch and abs(r2 - r) <= 1 and abs(c2 - c) <= 1)
    return near


KEYBOARD_NEIGHBOURS = _neighbours()


def spelling_noise(text: str, rate: float, rng: random.Random) -> str:
    """`text` with keyboard typos at about `rate` edits per letter (see the module docstring)."""
    if not 0.0 <= rate <= 1.0:
        raise MnrError(f"noise rate must be in [0, 1], got {rate}")
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        ch = chars[i]
        lower = ch.lower()
        if lower not in KEYBOARD_NEIGHBOURS or rng.random() >= rate:
            out.append(ch)
            i += 1
            continue
        edit = rng.choice(EDITS)
        if edit == "swap" and i + 1 < len(chars) and chars[i + 1] != " ":
            out.extend([chars[i + 1], ch])
            i += 2
            continue
        if edit == "delete" and len(chars) > 1:
            i += 1
            continue
        neighbour = rng.choice(KEYBOARD_NEIGHBOURS[lower])
        neighbour = neighbour.upper() if ch.isupper() else neighbour
        out.extend([ch, neighbour] if edit == "insert" else [neighbour])
        i += 1
    return "".join(out)


def noisy_variants(texts: Sequence[str], rate: float, seed: int, copies: int = 1) -> list[list[str]]:
    """For each text, `copies` noisy variants (deterministic in seed, copy number and text)."""
    return [[spelling_noise(text, rate, random.Random(ids.stable_hash("noise", seed, copy, text)))
             for copy in range(copies)] for text in texts]


@dataclass
class SyntheticQuery:
    """A synthetic query for a dataset, optionally judged against products.

    `judgments` are (product_id, scheme, label, grade); with no label (label None) the pair is
    written unlabelled, for the annotator to label.
    """

    text: str
    dataset: str
    judgments: list[tuple[str, str | None, str | None, int | None]]


def write_synthetic_queries(store: Store, queries: Sequence[SyntheticQuery], author: str, run_id: str | None) -> dict[str, int]:
    """Write synthetic queries (synthetic=true, origin 'synthetic'), their pairs and any labels, in one transaction.

    Labels copied from a source query are 'import' labels whose author names the augmentation.
    """
    query_rows, pair_rows, labels = [], [], []
    for query in queries:
        if not query.text.strip():
            continue
        qid = ids.query_id(query.dataset, query.text)
        query_rows.append({"query_id": qid, "dataset": query.dataset, "text": query.text.strip(), "synthetic": True,
                           "origin": "synthetic"})
        for product_id, scheme, label, grade in query.judgments:
            pid = ids.pair_id(qid, product_id)
            pair_rows.append({"pair_id": pid, "dataset": query.dataset, "query_id": qid, "product_id": product_id,
                              "origin": "synthetic", "raw_rating": None, "rating_variance": None})
            if label is not None and scheme is not None and grade is not None:
                labels.append(LabelRecord(pair_id=pid, scheme=scheme, label=label, grade=int(grade), source="import",
                                          author=author, run_id=run_id,
                                          dedup_key=f"{author}:" + ids.stable_hash(pid, scheme, label, length=24)))
    with store.transaction() as con:
        return {
            "queries": insert_new(con, "queries", pd.DataFrame(query_rows, columns=QUERY_COLUMNS), QUERY_COLUMNS),
            "pairs": insert_new(con, "pairs", pd.DataFrame(pair_rows, columns=PAIR_COLUMNS), PAIR_COLUMNS),
            "labels": store.add_labels(labels, con=con),
        }


def augment_with_noise(store: Store, dataset: str, rate: float = 0.05, seed: int = 0, copies: int = 1,
                       scheme: str | None = None, max_queries: int | None = None) -> dict[str, int]:
    """Add noisy copies of a dataset's queries; each copy inherits the source query's current labels.

    A variant identical to its source (no edit drawn) is skipped. Re-running with the same
    arguments adds nothing.
    """
    source = store.df(SOURCE_LABELS_SQL, {"dataset": dataset, "scheme": scheme})
    if source.empty:
        raise MnrError(f"{store.path}: no labelled non-synthetic queries in dataset '{dataset}'")
    texts = source.drop_duplicates("query_id")[["query_id", "text"]]
    if max_queries is not None:
        texts = texts.head(max_queries)
    judged = {qid: list(group[["product_id", "scheme", "label", "grade"]].itertuples(index=False, name=None))
              for qid, group in source.groupby("query_id")}
    params = {"dataset": dataset, "rate": rate, "seed": seed, "copies": copies, "scheme": scheme, "max_queries": max_queries}
    with store.run("augment", params) as run:
        synthetic = []
        for (qid, text), variants in zip(texts.itertuples(index=False, name=None),
                                         noisy_variants(texts["text"].tolist(), rate, seed, copies)):
            for variant in dict.fromkeys(variants):
                if ids.normalize_query(variant) != ids.normalize_query(text):
                    synthetic.append(SyntheticQuery(variant, dataset, judged[qid]))
        written = write_synthetic_queries(store, synthetic, f"{AUGMENT_AUTHOR}:seed={seed}", run.run_id)
        run.metrics.update({"source_queries": len(texts), **{f"inserted_{k}": v for k, v in written.items()}})
    return written
