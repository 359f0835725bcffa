"""`mnr ingest`, `mnr export`, `mnr status`: the store's own commands."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from app.context import console, err_console, get_store_path, open_store
from labelstore.config import section
from labelstore.errors import MnrError
from labelstore.export import events_path, export_labels
from labelstore.errors import IngestError
from labelstore.ingest import FORMATS, PRESETS, ingest_file, parse_flag_columns, parse_mapping
from labelstore.status import store_status


def ingest(
    path: Path = typer.Argument(..., help="CSV, Parquet or JSONL file of labelled query-product pairs."),
    fmt: Optional[str] = typer.Option(None, "--format", help=f"One of {', '.join(FORMATS)} (default: from the suffix)."),
    mapping: List[str] = typer.Option([], "--map", help="column=field, e.g. --map search_term=query (repeatable)."),
    preset: Optional[str] = typer.Option(None, "--preset", help=f"Column layout of a public dataset: {', '.join(PRESETS)}."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Label scheme (default: the preset's, else esci)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name (default: the preset's, else the file stem)."),
    encoding: Optional[str] = typer.Option(None, "--encoding", help="Text encoding (default: strict UTF-8; presets know theirs)."),
    rating_map: Optional[str] = typer.Option(
        None, "--rating-map",
        help="How a numeric rating column maps onto the scheme's labels (default: \\[ingest] rating_map in mnr.toml, "
             "else the scheme's map for the preset or dataset): comma-separated RULE=LABEL items, tried in order, "
             "the first that holds wins. RULE is a number (the rating equals it) or <N, <=N, >N, >=N. "
             "Exact values: '1=irrelevant,2=partial,3=relevant'; thresholds: "
             "'<1.5=irrelevant,<2.5=partial,>=2.5=relevant'. LABEL is a label (or alias) of the scheme."),
    unlabeled: bool = typer.Option(False, "--unlabeled", help="Add the pairs only, ignoring any label or rating "
                                   "column (a file with neither is read this way anyway)."),
    flag: List[str] = typer.Option([], "--flag", help="flag=column: a column of human decisions on a policy flag, "
                                   "e.g. --flag prohibited=is_prohibited (repeatable). Values yes/no, true/false or "
                                   "1/0; empty: no decision. They are stored with the imported labels."),
    flag_policy: Optional[str] = typer.Option(None, "--policy", help="With --flag: the policy (name or TOML path) "
                                              "whose [[flags]] the names must be (default: any built-in policy's)."),
) -> None:
    """Validate a file whole and add its pairs and labels. Re-ingesting the same file adds nothing.

    A file without a label or rating column adds unlabelled pairs, ready for `mnr label --select unlabeled`.
    """
    flags = _declared_flags(parse_flag_columns(flag), flag_policy)
    store = open_store()
    with console.status(f"ingesting {path}"):
        result = ingest_file(store, path, fmt=fmt, preset=preset, mapping=parse_mapping(mapping), scheme=scheme,
                             dataset=dataset, encoding=encoding, unlabeled=unlabeled, flags=flags,
                             rating_map=rating_map if rating_map is not None else _config_rating_map())
    added = ", ".join(f"{n} {table}" for table, n in result.inserted.items())
    console.print(f"{path}: read {result.rows_read} rows ({result.encoding or 'binary'}), "
                  f"dataset '{result.dataset}', scheme '{result.scheme}': added {added}")
    if result.title_conflicts:
        n = len(result.title_conflicts)
        err_console.print(f"[yellow]warning:[/] {n} {'title differs' if n == 1 else 'titles differ'} from the one kept "
                          "for its product id (its first row's in this file, or the store's): "
                          + escape("; ".join(result.title_conflicts[:3])) + ("; ..." if n > 3 else ""))
    if not result.labelled:
        console.print(f"no label or rating column: the pairs are unlabelled; label them with "
                      f"`mnr label --select unlabeled --dataset {result.dataset}`")


def _config_rating_map() -> str | None:
    value = section("ingest").get("rating_map")
    if value is None or isinstance(value, str):
        return value
    raise MnrError(f"[ingest] rating_map in mnr.toml must be a string such as '1=irrelevant,2=partial,3=relevant', "
                   f"not {value!r}")


def _declared_flags(flags: dict[str, str], policy: str | None) -> dict[str, str]:
    """`flags` ({name: column}) when every name is a flag `policy` declares (None: any built-in policy);
    else an `IngestError`: a misspelt flag would be stored, exported, and never learnt."""
    from annotator.prompts import list_policies, load_prompt_policy

    if not flags:
        return flags
    policies = [load_prompt_policy(policy)] if policy else [load_prompt_policy(name) for name in list_policies()]
    declared = sorted({name for loaded in policies for name in loaded.flag_names})
    unknown = sorted(set(flags) - set(declared))
    if unknown:
        where = f"not declared by policy '{policies[0].name}'" if policy else "declared by no built-in policy"
        raise IngestError("--flag", [(None, None, f"flag(s) {', '.join(unknown)} {where} (declared: "
                                                  f"{', '.join(declared) or 'none'}); a flag of your own policy file "
                                                  "needs --policy PATH")])
    return flags


def export(
    out: Path = typer.Argument(..., help="Output file: .parquet, .csv or .jsonl."),
    fmt: Optional[str] = typer.Option(None, "--format", help="parquet, csv or jsonl (default: from the suffix)."),
    history: bool = typer.Option(False, "--history", help="Every label ever written, not just the current ones, "
                                 "and beside it (NAME.events.SUFFIX) the audit trail: decisions, skips, undos, "
                                 "adjudications, account changes and logins."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Only this scheme."),
    source: Optional[str] = typer.Option(None, "--source", help="Only this source: human, llm, audit or import."),
) -> None:
    """Write labels with provenance columns (source, author, run, probabilities, raw rating)."""
    rows = export_labels(open_store(), out, fmt=fmt, history=history, scheme=scheme, source=source)
    console.print(f"wrote {rows} {'history' if history else 'current'} labels to {out}")
    if history:
        console.print(f"wrote the audit trail (review events, adjudications, logins) to {events_path(out)}")


def status(
    runs: int = typer.Option(10, "--runs", help="How many of the latest runs to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Counts per table, label distribution by source and scheme, policy flags, and the latest runs."""
    info = store_status(open_store(), runs)
    if as_json:
        console.print_json(json.dumps({
            "store": get_store_path(), "schema_version": info.schema_version, "tables": info.table_counts,
            "current_labels": info.current_distribution.to_dict("records"),
            "flags": info.flags.to_dict("records"),
            "latest_runs": info.latest_runs.astype(str).to_dict("records"),
        }))
        return
    console.print(f"[bold]store[/] {get_store_path()} (schema {info.schema_version})")
    counts = Table("table", "rows", title="Tables")
    for table, n in info.table_counts.items():
        counts.add_row(table, f"{n:,}")
    console.print(counts)
    labels = Table("scheme", "source", "label", "current", title="Current labels by scheme and source")
    for row in info.current_distribution.itertuples():
        labels.add_row(row.scheme, row.source, row.label, f"{row.n:,}")
    console.print(labels)
    if len(info.flags):
        flags = Table("scheme", "flag", "pairs scored or decided", "flagged", "set by a human", "cleared by a human",
                      title="Policy flags of the pairs (current state)")
        for row in info.flags.itertuples():
            flags.add_row(row.scheme, row.flag, f"{row.pairs:,}", f"{row.flagged:,}", f"{row.decided_set:,}",
                          f"{row.decided_cleared:,}")
        console.print(flags)
    recent = Table("run", "kind", "status", "started", "finished", title="Latest runs")
    for row in info.latest_runs.itertuples():
        recent.add_row(row.run_id, row.kind, row.status, str(row.started_at)[:19], str(row.finished_at)[:19])
    console.print(recent)


def register(app: typer.Typer) -> None:
    app.command()(ingest)
    app.command()(export)
    app.command()(status)
