"""Ingestion of query-product pairs, labelled or not, from CSV, Parquet or JSONL.

A file is validated whole before anything is written: a missing column, undecodable bytes, an
empty query or title, an unknown label, a bad rating, or one pair given two different labels
rejects the file with an `IngestError` naming the file, row and field. Valid files are written in
one transaction, and every row is keyed by content, so re-ingesting a file adds nothing.

Labels come from a label column (names or aliases of the scheme) or from a numeric rating column
through a rating map: the caller's own (`rating_map`, see `labelstore.schemes.RATING_MAP_SYNTAX`)
or the scheme's map for the rating source. A file with neither column (or ingested with
`unlabeled=True`) adds pairs without labels, for `mnr label --select unlabeled`.

Human flag decisions (`flags`, `mnr ingest --flag prohibited=is_prohibited`) map a policy flag onto a
column of yes/no values (yes, no, true, false, 1, 0; empty: no decision). They become the imported
labels' `flag_decisions`; a row's decisions are part of its label's key, so ingesting the file again
with the same options adds nothing, and adding decisions later adds the labels that carry them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from labelstore import ids
from labelstore.errors import IngestError, SchemeError
from labelstore.schemes import LabelScheme, RatingRules, load_scheme, parse_rating_map
from labelstore.sqlfiles import sql
from labelstore.store import (
    PAIR_COLUMNS, PRODUCT_COLUMNS, QUERY_COLUMNS, LabelRecord, Store, _insert_labels, flags_frame, insert_new,
    labels_frame,
)

FIELDS = ("record_id", "query", "query_source_id", "product_id", "title", "description", "brand",
          "label", "rating", "rating_variance")
FORMATS = ("csv", "parquet", "jsonl")
LABEL_FIELDS = ("label", "rating", "rating_variance")
FLAG_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # as a policy's [[flags]] name
FLAG_TRUE = ("yes", "true", "1", "1.0")  # any case; 1.0 / 0.0: a numeric Parquet column
FLAG_FALSE = ("no", "false", "0", "0.0")


@dataclass(frozen=True)
class Preset:
    """How one public dataset's files map onto the store's fields."""

    name: str
    mapping: dict[str, str]
    scheme: str
    rating_source: str | None = None
    encodings: tuple[str, ...] = ("utf-8",)
    attribute_columns: tuple[str, ...] = ()
    description: str = ""


PRESETS: dict[str, Preset] = {
    "homedepot": Preset(
        "homedepot",
        {"record_id": "id", "query": "search_term", "product_id": "product_uid", "title": "product_title", "rating": "relevance"},
        scheme="graded3", rating_source="homedepot",
        # The Kaggle original is ISO-8859-1; the shared copy is UTF-8. Try strict UTF-8 first.
        encodings=("utf-8", "iso-8859-1"),
        description="Kaggle Home Depot train.csv: mean rating 1-3 (kept as raw_rating)",
    ),
    "crowdflower": Preset(
        "crowdflower",
        {"record_id": "id", "query": "query", "title": "product_title", "description": "product_description",
         "rating": "median_relevance", "rating_variance": "relevance_variance"},
        scheme="graded4", rating_source="crowdflower",
        description="Kaggle CrowdFlower train.csv: median rating 1-4 plus rater variance",
    ),
    "esci": Preset(
        "esci",
        {"record_id": "example_id", "query": "query", "query_source_id": "query_id", "product_id": "product_id", "title": "product_title",
         "description": "product_description", "brand": "product_brand", "label": "esci_label"},
        scheme="esci",
        attribute_columns=("product_bullet_point", "product_color", "product_locale"),
        description="Amazon Shopping Queries (ESCI): E/S/C/I labels",
    ),
}


@dataclass
class IngestResult:
    path: str
    dataset: str
    scheme: str
    encoding: str | None
    rows_read: int
    inserted: dict[str, int] = field(default_factory=dict)
    labelled: bool = True
    # products given a title other than the one kept: their first row's in this file, or the store's
    title_conflicts: list[str] = field(default_factory=list)


# -- reading --------------------------------------------------------------------------------
def _decode(path: Path, encodings: Iterable[str]) -> tuple[str, str]:
    raw = path.read_bytes()
    failures = []
    for encoding in encodings:
        try:
            text = raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
            return text, encoding
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            failures.append(f"bytes at line {line} (offset {exc.start}) are not valid {encoding}")
    hint = "; pass --encoding iso-8859-1 (or the file's real encoding) if it is not UTF-8"
    raise IngestError(str(path), [(None, None, "; ".join(failures) + hint)])


def read_rows(path: Path, fmt: str, encodings: Iterable[str] = ("utf-8",)) -> tuple[list[str], list[dict[str, Any]], str | None]:
    """(columns, rows, encoding used) of a CSV, JSONL or Parquet file."""
    if not path.is_file():
        raise IngestError(str(path), [(None, None, "no such file")])
    if fmt == "csv":
        text, encoding = _decode(path, encodings)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise IngestError(str(path), [(reader.line_num, None, f"malformed CSV: {exc}")]) from exc
        return list(reader.fieldnames or []), rows, encoding
    if fmt == "jsonl":
        text, encoding = _decode(path, encodings)
        rows, columns = [], {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise IngestError(str(path), [(number, None, f"not valid JSON: {exc.msg}")]) from exc
            if not isinstance(row, dict):
                raise IngestError(str(path), [(number, None, "each line must be a JSON object")])
            rows.append(row)
            columns.update(dict.fromkeys(row))
        return list(columns), rows, encoding
    if fmt == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise IngestError(str(path), [(None, None, f"not a readable Parquet file: {exc}")]) from exc
        return list(frame.columns), frame.to_dict("records"), None
    raise IngestError(str(path), [(None, None, f"unknown format '{fmt}' (use one of {', '.join(FORMATS)})")])


def guess_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"csv": "csv", "parquet": "parquet", "pq": "parquet", "jsonl": "jsonl", "ndjson": "jsonl"}.get(suffix, "csv")


# -- validation -----------------------------------------------------------------------------
def _text(value: Any) -> str:
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return ""  # pd.NA: an empty cell of a nullable column, as an export writes flag decisions
    return str(value).strip()


def _number(value: Any) -> float | None:
    text = _text(value)
    if text == "":
        return None
    return float(text)


def _is_labelled(mapping: dict[str, str]) -> bool:
    return "label" in mapping or "rating" in mapping


def _check_columns(path: Path, columns: list[str], mapping: dict[str, str]) -> None:
    problems = []
    needed = ["query", "title"] + [f for f in ("label", "rating") if f in mapping]
    for name in needed:
        column = mapping.get(name)
        if column is None:
            problems.append((None, name, f"no column is mapped to the required field '{name}'"))
        elif column not in columns:
            hint = ("; pass --unlabeled to add the pairs without labels" if name in LABEL_FIELDS else "")
            problems.append((None, column, f"missing column '{column}' (needed for field '{name}'); "
                                           f"the file has: {', '.join(columns) or 'no columns'}{hint}"))
    if problems:
        raise IngestError(str(path), problems)


def _check_flag_columns(path: Path, columns: list[str], flag_columns: dict[str, str], labelled: bool) -> None:
    problems = [(None, column, f"missing column '{column}' (needed for flag '{name}'); "
                                f"the file has: {', '.join(columns) or 'no columns'}")
                for name, column in flag_columns.items() if column not in columns]
    if flag_columns and not labelled:
        problems.append((None, None, "flag decisions belong to labels, and this file adds none (no label or rating "
                                     "column, or --unlabeled); map a label or rating column, or drop --flag"))
    if problems:
        raise IngestError(str(path), problems)


def flag_decision(value: Any) -> bool | None:
    """A yes/no cell as a decision: True (set), False (cleared) or None (empty: no decision).

    Raises ValueError for anything else."""
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text == "":
        return None
    if text in FLAG_TRUE:
        return True
    if text in FLAG_FALSE:
        return False
    raise ValueError(text)


def _row_flags(number: int, get_column: Any, flag_columns: dict[str, str],
               problems: list[tuple[int | None, str | None, str]]) -> dict[str, bool] | None:
    decisions: dict[str, bool] = {}
    for name, column in flag_columns.items():
        try:
            decision = flag_decision(get_column(column))
        except ValueError as exc:
            problems.append((number, column, f"flag '{name}': '{exc}' is not a decision (use yes/no, true/false "
                                             "or 1/0; leave it empty for no decision)"))
            continue
        if decision is not None:
            decisions[name] = decision
    return decisions or None


def _check_rating_source(path: Path, mapping: dict[str, str], scheme: LabelScheme, source: str,
                         rating_map: RatingRules | None) -> None:
    """Fail once, before reading rows, when ratings have nowhere to map to."""
    if "label" in mapping or "rating" not in mapping or rating_map is not None or source in scheme.rating_maps:
        return
    known = ", ".join(scheme.rating_maps) or "none"
    example = ",".join(f"{grade + 1}={name}" for name, grade in reversed(scheme.grades.items()))
    raise IngestError(str(path), [(None, mapping["rating"], (
        f"scheme '{scheme.name}' has no rating map for '{source}' (its maps: {known}); "
        f"say how your ratings map onto its labels ({', '.join(scheme.label_names)}) with --rating-map, "
        f"e.g. --rating-map '{example}' (thresholds work too: see `mnr ingest --help`), "
        "or with [ingest] rating_map in mnr.toml"))])


def _row_label(get: Any, mapping: dict[str, str], scheme: LabelScheme, source: str, rating: float | None,
               rating_map: RatingRules | None) -> str | None:
    """The row's label from its label column or its rating; None for an unlabelled file."""
    if "label" in mapping:
        raw_label = _text(get("label"))
        if not raw_label:
            raise SchemeError("empty label")
        return scheme.normalize(raw_label)
    if "rating" not in mapping:
        return None
    if rating is None:
        raise SchemeError("empty rating")
    return rating_map.label_for(rating) if rating_map is not None else scheme.map_rating(source, rating)


def normalise_rows(path: Path, rows: list[dict[str, Any]], mapping: dict[str, str], dataset: str,
                   scheme: LabelScheme, rating_source: str | None,
                   attribute_columns: Iterable[str] = (), *, rating_map: RatingRules | None = None,
                   flag_columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Validate every row and return one normalised row per input row; raise on any problem.

    A product id given two titles is not an error (catalog exports repeat a product with edited titles); the
    first title is stored, and ``frame.attrs['title_conflicts']`` describes each later row that differs.
    Rows of an unlabelled mapping (no label or rating field) get label and grade None. `flag_columns`
    ({flag: column}) give each row's `flag_decisions` ({flag: bool}, None when the row has none)."""
    flag_columns = flag_columns or {}
    problems: list[tuple[int | None, str | None, str]] = []
    out = []
    first_seen: dict[str, tuple[int, str]] = {}
    first_title: dict[str, tuple[int, str]] = {}
    title_conflicts: list[str] = []
    for number, row in enumerate(rows, start=1):
        def get(name: str) -> Any:
            column = mapping.get(name)
            return row.get(column) if column else None

        query, title = _text(get("query")), _text(get("title"))
        if not query:
            problems.append((number, mapping["query"], "empty query"))
        if not title:
            problems.append((number, mapping["title"], "empty product title"))
        rating = variance = None
        label = None
        try:
            rating = _number(get("rating")) if "rating" in mapping else None
            variance = _number(get("rating_variance")) if "rating_variance" in mapping else None
        except ValueError:
            problems.append((number, mapping.get("rating"), f"not a number: '{_text(get('rating'))}'"))
            continue
        try:
            label = _row_label(get, mapping, scheme, rating_source or dataset, rating, rating_map)
        except SchemeError as exc:
            problems.append((number, mapping.get("label") or mapping.get("rating"), str(exc)))
            continue
        decisions = _row_flags(number, row.get, flag_columns, problems)
        if not query or not title:
            continue
        description = _text(get("description")) or None
        source_product = _text(get("product_id")) or ids.stable_hash(title, description or "")
        seen_at, seen_title = first_title.setdefault(source_product, (number, title))
        if seen_title != title:
            title_conflicts.append(f"row {number}: product '{source_product}' titled '{title}', row {seen_at} "
                                   f"'{seen_title}'")
        qid = ids.query_id(dataset, query)
        pid = ids.product_id(dataset, source_product)
        pair = ids.pair_id(qid, pid)
        # One judgment per record: a pair rated by several rater groups keeps every judgment.
        record = _text(get("record_id")) or None
        key = f"record:{record}" if record else pair
        judgment = label if decisions is None else f"{label}, flags {_flags_text(decisions)}"
        if key in first_seen and first_seen[key][1] != judgment:
            what = f"record id '{record}'" if record else f"pair (query '{query}', product '{source_product}')"
            problems.append((number, mapping.get("label") or mapping.get("rating"),
                             f"duplicate {what} with label '{judgment}'; row {first_seen[key][0]} gave "
                             f"'{first_seen[key][1]}'"))
            continue
        first_seen.setdefault(key, (number, judgment))
        attributes = {c: _text(row.get(c)) for c in attribute_columns if _text(row.get(c))}
        out.append({
            "pair_id": pair, "record_id": record or pair, "dataset": dataset, "query_id": qid, "text": query, "product_id": pid,
            "source_id": source_product, "title": title, "description": description,
            "brand": _text(get("brand")) or None, "attributes": json.dumps(attributes) if attributes else None,
            "label": label, "grade": scheme.grade_of(label) if label is not None else None,
            "raw_rating": rating, "rating_variance": variance, "flag_decisions": decisions,
        })
    if problems:
        raise IngestError(str(path), problems)
    frame = pd.DataFrame(out)
    frame.attrs["title_conflicts"] = title_conflicts
    return frame


# -- writing --------------------------------------------------------------------------------
def write_pairs(store: Store, frame: pd.DataFrame, scheme: str, author: str, run_id: str | None,
                origin: str = "import") -> dict[str, int]:
    """Write normalised rows (products, queries, pairs, import labels) in one transaction.

    Rows whose label is None add their pair only."""
    # A pair judged several times keeps the mean of its raw ratings; every judgment is a label row.
    mean_rating = pd.to_numeric(frame["raw_rating"]).groupby(frame["pair_id"]).transform("mean")
    frame = frame.assign(synthetic=False, origin=origin, raw_rating=mean_rating)
    records = [
        LabelRecord(pair_id=r.pair_id, scheme=scheme, label=r.label, grade=int(r.grade), source="import",
                    author=author, run_id=run_id, flag_decisions=_decisions(r),
                    dedup_key="import:" + ids.stable_hash(r.pair_id, r.record_id, scheme, r.label,
                                                          *_flag_key(_decisions(r)), length=24))
        for r in frame.itertuples() if r.label is not None
    ]
    with store.transaction() as con:
        return {
            "products": insert_new(con, "products", frame, PRODUCT_COLUMNS),
            "queries": insert_new(con, "queries", frame, QUERY_COLUMNS),
            "pairs": insert_new(con, "pairs", frame, PAIR_COLUMNS),
            "labels": _insert_labels(con, labels_frame(records), flags_frame(records)),
        }


def _decisions(row: Any) -> dict[str, bool] | None:
    return getattr(row, "flag_decisions", None) or None


def _flag_key(decisions: dict[str, bool] | None) -> tuple[str, ...]:
    """A label's flag decisions as part of its key; none: nothing, so keys of labels without flags stay."""
    return (f"flags:{_flags_text(decisions)}",) if decisions else ()


def _flags_text(decisions: dict[str, bool]) -> str:
    return ",".join(f"{name}={'yes' if value else 'no'}" for name, value in sorted(decisions.items()))


def parse_flag_columns(items: Iterable[str]) -> dict[str, str]:
    """`--flag name=column` options into {flag name: column}."""
    flags: dict[str, str] = {}
    for item in items:
        name, _, column = (part.strip() for part in item.partition("="))
        if not column:
            raise IngestError("--flag", [(None, None, f"'{item}' is not flag=column (e.g. prohibited=is_prohibited)")])
        if not FLAG_NAME.match(name):
            raise IngestError("--flag", [(None, None, f"'{name}' is not a flag name: lower-case letters, digits "
                                                      "and _, starting with a letter (as in the policy's [[flags]])")])
        if name in flags:
            raise IngestError("--flag", [(None, None, f"flag '{name}' is mapped twice")])
        flags[name] = column
    return flags


def parse_mapping(items: Iterable[str], fields: Iterable[str] = FIELDS) -> dict[str, str]:
    """`--map column=field` options into {field: column}; `fields` are the names a file may map onto."""
    fields = tuple(fields)
    mapping: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise IngestError("--map", [(None, None, f"'{item}' is not column=field")])
        column, name = (part.strip() for part in item.split("=", 1))
        if name not in fields:
            raise IngestError("--map", [(None, None, f"unknown field '{name}' (fields: {', '.join(fields)})")])
        mapping[name] = column
    return mapping


def resolve_mapping(columns: list[str], preset: Preset | None, overrides: dict[str, str]) -> dict[str, str]:
    """{field: column}: the preset's mapping (or same-named columns) with `--map` overrides on top."""
    if preset is not None:
        base = dict(preset.mapping)
    else:
        base = {name: name for name in FIELDS if name in columns}
    base.update(overrides)
    if "label" in overrides and "rating" not in overrides and base.get("rating") not in columns:
        base.pop("rating", None)
    return base


def ingest_file(store: Store, path: str | Path, *, fmt: str | None = None, preset: str | None = None,
                mapping: dict[str, str] | None = None, scheme: str | None = None, dataset: str | None = None,
                encoding: str | None = None, rating_source: str | None = None, rating_map: str | None = None,
                unlabeled: bool = False, flags: dict[str, str] | None = None) -> IngestResult:
    """Validate and write one file. Raises `IngestError` (and writes nothing) on any bad row.

    `rating_map` (`RATING_MAP_SYNTAX`) maps a rating column onto the scheme's labels instead of the
    scheme's own map for the rating source; it is unused when labels come from a label column.
    `unlabeled` ignores any label or rating column and adds the pairs only, as does a file that has
    neither. `flags` ({flag name: column}, `parse_flag_columns`) read human flag decisions onto the labels.
    """
    path = Path(path)
    flags = flags or {}
    chosen = PRESETS.get(preset) if preset else None
    if preset and chosen is None:
        raise IngestError(str(path), [(None, None, f"unknown preset '{preset}' (presets: {', '.join(PRESETS)})")])
    fmt = fmt or guess_format(path)
    scheme_obj = load_scheme(scheme or (chosen.scheme if chosen else "esci"))
    rules = _parse_rating_map(path, rating_map, scheme_obj)
    dataset = dataset or (chosen.name if chosen else path.stem)
    encodings = (encoding,) if encoding else (chosen.encodings if chosen else ("utf-8",))
    columns, rows, used_encoding = read_rows(path, fmt, encodings)
    full_mapping = resolve_mapping(columns, chosen, mapping or {})
    if unlabeled:
        full_mapping = {name: column for name, column in full_mapping.items() if name not in LABEL_FIELDS}
    _check_columns(path, columns, full_mapping)
    _check_flag_columns(path, columns, flags, _is_labelled(full_mapping))
    source = rating_source or (chosen.rating_source if chosen else None) or dataset
    _check_rating_source(path, full_mapping, scheme_obj, source, rules)
    if not rows:
        raise IngestError(str(path), [(None, None, "the file has no data rows")])
    frame = normalise_rows(path, rows, full_mapping, dataset, scheme_obj, source,
                           chosen.attribute_columns if chosen else (), rating_map=rules, flag_columns=flags)
    labelled = _is_labelled(full_mapping)
    used_map = rules.text if rules is not None and "label" not in full_mapping and "rating" in full_mapping else None
    params = {"path": str(path), "format": fmt, "preset": preset, "scheme": scheme_obj.name,
              "dataset": dataset, "encoding": used_encoding, "file_sha256": ids.file_hash(str(path)),
              "labelled": labelled, "rating_map": used_map, "flags": flags or None}
    title_conflicts = frame.attrs["title_conflicts"] + stored_title_conflicts(store, frame)
    with store.run("ingest", params) as run:
        inserted = write_pairs(store, frame, scheme_obj.name, f"import:{path.name}", run.run_id)
        run.metrics.update({"rows_read": len(rows), **{f"inserted_{k}": v for k, v in inserted.items()},
                            "rows_with_conflicting_title": len(title_conflicts)})
        if flags:
            run.metrics["rows_with_flag_decisions"] = int(frame["flag_decisions"].notna().sum())
    return IngestResult(str(path), dataset, scheme_obj.name, used_encoding, len(rows), inserted, labelled,
                        title_conflicts)


def stored_title_conflicts(store: Store, frame: pd.DataFrame) -> list[str]:
    """One line per product of `frame` (normalised rows) that the store already holds under another title: the
    stored title stays (products are written once), so the file's is not kept."""
    first = frame.drop_duplicates("product_id")
    stored = store.df(sql("labelstore", "stored_titles"), {"product_ids": first["product_id"].tolist()})
    joined = first.merge(stored, on="product_id", suffixes=("", "_stored"))
    return [f"product '{r.source_id}' titled '{r.title}' is stored as '{r.title_stored}'"
            for r in joined.itertuples() if r.title != r.title_stored]


def _parse_rating_map(path: Path, text: str | None, scheme: LabelScheme) -> RatingRules | None:
    if text is None:
        return None
    try:
        return parse_rating_map(text, scheme)
    except SchemeError as exc:
        raise IngestError(str(path), [(None, None, f"bad rating map: {exc}")]) from exc
