"""Fixed samples of labelled files: every row of a seeded draw of queries."""
from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from labelstore.errors import MnrError
from labelstore.ingest import PRESETS, guess_format, read_rows, resolve_mapping


def sample_by_query(path: Path, preset: str | None, sample_queries: int, seed: int, out_dir: Path,
                    encoding: str | None = None) -> Path:
    """A CSV of every row of `sample_queries` queries of a labelled file, chosen by a seeded draw.

    Rows of one query stay together so retrieval has complete judgment lists. Written once to
    `out_dir/<stem>-<n>q-seed<seed>.csv` and reused: the sample is fixed for a given (n, seed).
    """
    out = out_dir / f"{path.stem}-{sample_queries}q-seed{seed}.csv"
    if out.is_file():
        return out
    chosen = PRESETS.get(preset) if preset else None
    encodings = (encoding,) if encoding else (chosen.encodings if chosen else ("utf-8",))
    columns, rows, _ = read_rows(path, guess_format(path), encodings)
    query_column = resolve_mapping(columns, chosen, {}).get("query")
    if query_column not in columns:
        raise MnrError(f"{path}: cannot sample by query: no query column (have: {', '.join(columns)})")
    queries = sorted({str(row[query_column]).strip().lower() for row in rows})
    rng = random.Random(seed)
    keep = set(rng.sample(queries, min(sample_queries, len(queries))))
    sample = [row for row in rows if str(row[query_column]).strip().lower() in keep]
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    pd.DataFrame(sample, columns=columns).to_csv(partial, index=False)
    partial.replace(out)
    return out
