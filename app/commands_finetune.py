"""`mnr finetune` (LoRA adapter from the store's human labels) and `mnr eval-labeler` (any labeler vs human)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import typer
from rich.table import Table

from app.context import console, open_store
from app.labeler_training import rating_scale_for
from labelstore.errors import MnrError
from labelstore.schemes import LabelScheme, load_scheme

STORE_SOURCES = ("human", "import", "llm", "audit")
FILE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def _parse_sources(text: str, option: str) -> list[str]:
    sources = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [s for s in sources if s not in STORE_SOURCES]
    if not sources or unknown:
        raise MnrError(f"{option} '{text}': expected a comma-separated list of {', '.join(STORE_SOURCES)}")
    return sources


# -- mnr finetune -------------------------------------------------------------------------------------
def finetune_command(
    policy: str = typer.Option("esci", "--policy", help="Policy name in prompts/policies/ or path of its .toml."),
    model: str = typer.Option("smollm2", "--model", help="Base model: pulled name, local HF folder or cached hub id."),
    out: Path = typer.Option(..., "--out", help="Output folder for the adapter, meta.json and split.json."),
    sources: str = typer.Option("human", "--sources", help="Label sources to train on, e.g. human or human,import."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes",
                                                help="Wall-clock budget of the whole command (caching, training, dev "
                                                     "scoring and calibration)."),
    max_steps: int = typer.Option(2000, "--max-steps", help="Most optimiser steps."),
    max_epochs: float = typer.Option(6.0, "--max-epochs", help="Most passes over the training pairs."),
    flag_weight: float = typer.Option(0.3, "--flag-weight", min=0.0, help="Weight of the policy flags' answer loss "
                                      "beside the grade's (0: flags are scored but not learnt)."),
    vocab_loss_weight: float = typer.Option(1.0, "--vocab-loss-weight", min=0.0,
                                            help="Weight of the answer token's whole-vocabulary cross-entropy beside "
                                                 "the one over the labels alone (0: only the label choice is learnt; "
                                                 "every backend reads the labels' log-probabilities renormalised)."),
    min_steps: int = typer.Option(10, "--min-steps", help="A --max-minutes budget that cannot fit this many steps "
                                  "(measured once dev is cached) is an error, not a barely trained adapter."),
    eval_every: int = typer.Option(100, "--eval-every", help="Score the dev split every this many steps."),
    patience: int = typer.Option(4, "--patience", help="Stop after this many dev evaluations without improvement."),
    select_metric: str = typer.Option("qwk", "--select-metric",
                                      help="Dev metric for early stopping: qwk, kappa, accuracy, macro_f1, log_loss, ..."),
    batch_size: int = typer.Option(32, "--batch-size"),
    warmup_steps: int = typer.Option(20, "--warmup-steps", help="Steps of linear learning-rate warm-up."),
    learning_rate: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="After warm-up: constant, or linear (decays to 0 "
                                    "at the end of the budget: --max-minutes, else --max-steps)."),
    target_epochs: float = typer.Option(1.5, "--target-epochs", help="Cached path: stop caching train pairs where "
                                        "those cached could still be trained on this many times in the budget left "
                                        "(more: fewer distinct pairs, more steps)."),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank."),
    lora_alpha: int = typer.Option(16, "--lora-alpha"),
    class_weighting: str = typer.Option("balanced", "--class-weighting", help="balanced, sqrt or none."),
    dev_fraction: float = typer.Option(0.2, "--dev-fraction", help="Share of queries (or pairs) held out for dev."),
    dev_split: str = typer.Option("query", "--dev-split",
                                  help="query: dev queries have no train pair (labelling new queries); pair: dev pairs "
                                       "drawn at random (finishing queries people started). Selection, temperature "
                                       "and stack fit dev."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Use at most this many training pairs."),
    max_dev: Optional[int] = typer.Option(1000, "--max-dev", help="Score at most this many dev pairs."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    train_top_k: int = typer.Option(4, "--train-top-k",
                                    help="LoRA on the top K blocks only, over cached outputs of the frozen lower "
                                         "blocks (computed once per pair); 0 trains every block, no cache."),
    pair_form: str = typer.Option("short", "--pair-form",
                                  help="Pair part of the prompt: short (query, title, brand, description cut hard) "
                                       "or full (the policy's limits); recorded in meta.json for labelling."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype",
                                      help="Precision of the training arithmetic: auto (bfloat16 on a CPU with native "
                                           "bf16, AMX or AVX512-BF16; else float32), float32 or bfloat16. Weights "
                                           "and dev scoring stay float32, as the labeler serves."),
    cache_memory_gb: float = typer.Option(4.0, "--cache-memory-gb",
                                          help="Layer cache kept in memory up to this size, else spilled to disk."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out from its checkpoint."),
    no_answer_head: bool = typer.Option(False, "--no-answer-head",
                                        help="Fit no answer head (a linear head on the last hidden state, fitted in "
                                             "closed form after training, served as a LoRA on lm_head; kept only "
                                             "where it beats the adapter without it on dev)."),
    judged_examples: int = typer.Option(0, "--judged-examples",
                                        help="Show each prompt the labels people gave the query's other products: "
                                             "their counts and the labels of the K judged titles nearest to it "
                                             "(short pair form; mnr label draws them from the store). 0: none."),
    judged_counts: str = typer.Option("beyond_k", "--judged-counts",
                                      help="With --judged-examples, when the label counts line is shown: beyond_k "
                                           "(only where the query has more judged pairs than K; otherwise the "
                                           "nearest line lists them all) or always."),
    match_hint: bool = typer.Option(False, "--match-hint",
                                    help="Show each prompt how many query words the title holds ('Query words "
                                         "in title: 2 of 3'; short pair form): a count that carries over to "
                                         "queries the adapter never trained on."),
    no_stack: bool = typer.Option(False, "--no-stack", help="Fit no calibrated stack (the text baseline's match "
                                  "features + the adapter's scores, applied by mnr label) beside the adapter."),
    retriever: Optional[str] = typer.Option(None, "--retriever", help="Add this retriever's query-title cosine to "
                                            "the stack's inputs: a registered model id, zero-shot, latest-stage1, "
                                            "latest-stage2 or a folder; mnr label then loads it too."),
) -> None:
    """Train a LoRA adapter on the store's human labels under a policy; calibrate it on dev."""
    import time

    started_at = time.monotonic()  # the budget counts importing torch and reading the store too
    if retriever is not None and no_stack:
        raise typer.BadParameter("the retriever's cosine is an input of the stack: drop --no-stack",
                                 param_hint="--retriever")

    import torch

    from annotator.finetune import FinetuneArgs
    from app.labeler_training import finetune_data, run_finetune

    if threads:
        torch.set_num_threads(threads)
    source_list = _parse_sources(sources, "--sources")
    store = open_store()
    args = FinetuneArgs(lora_r=lora_r, lora_alpha=lora_alpha, learning_rate=learning_rate, batch_size=batch_size,
                        max_steps=max_steps, max_epochs=max_epochs, eval_every=eval_every, patience=patience,
                        max_minutes=max_minutes, class_weighting=class_weighting, select_metric=select_metric,
                        dev_fraction=dev_fraction, max_train=max_train, max_dev=max_dev, seed=seed,
                        warmup_steps=warmup_steps, train_top_k=train_top_k, pair_form=pair_form,
                        cache_memory_gb=cache_memory_gb, stack=not no_stack, min_steps=min_steps,
                        flag_weight=flag_weight, vocab_loss_weight=vocab_loss_weight, dev_split=dev_split,
                        compute_dtype=compute_dtype, answer_head=not no_answer_head, judged_examples=judged_examples,
                        judged_counts=judged_counts, match_hint=match_hint, lr_schedule=lr_schedule,
                        target_epochs=target_epochs)
    data = finetune_data(store, policy, source_list, args)
    train, dev, loaded_policy = data.train, data.dev, data.policy
    console.print(f"training on {len(train):,} pairs ({train['query_id'].nunique():,} queries), dev {len(dev):,} pairs "
                  f"({dev['query_id'].nunique():,} queries), scheme '{loaded_policy.scheme.name}', policy "
                  f"'{loaded_policy.name}' {loaded_policy.version}")
    if loaded_policy.flags:
        with_decisions = int(train["flags"].map(lambda d: bool(d)).sum())
        console.print(f"flags {', '.join(loaded_policy.flag_names)}: {with_decisions:,} train pairs carry flag decisions")
    cosine = None
    if retriever is not None:
        from app.retriever_cosine import retriever_cosine

        cosine = retriever_cosine(store, retriever)
    result, _ = run_finetune(store, data, model, out, args, progress=_print_progress, resume=resume,
                             started_at=started_at, retriever=cosine)
    meta = result.meta
    dev_metrics = meta["dev_metrics"]
    _print_path(meta)
    if meta["calibration"]["status"] != "ok":
        console.print(f"[yellow]warning: calibration failed: {meta['calibration']['reason']}; stored temperature 1.0[/]")
    console.print(f"stopped after {meta['steps']} steps ({meta['stop_reason']}, {meta['train_seconds']:.0f}s); "
                  f"temperature {meta['temperature']:.3f}; dev accuracy {dev_metrics['accuracy']:.3f}, "
                  f"QWK {dev_metrics['qwk']:.3f}, ECE {meta['dev_metrics_uncalibrated']['ece']:.3f} -> "
                  f"{dev_metrics['ece']:.3f}")
    _print_decision("the adapter alone (no stack, or --no-stack)", (meta.get("decision") or {}).get("dev_report"))
    _print_flags(meta)
    _print_stack(meta.get("stack"))
    console.print(f"adapter written to {out} (label with: mnr label --model {model} --adapter {out} --policy {policy})")


def _print_flags(meta: dict[str, Any]) -> None:
    if not meta.get("flag_names"):
        return
    if meta["flags_undecided"]:
        console.print(f"[yellow]warning: no training label decides flag(s) {', '.join(meta['flags_undecided'])}: "
                      "not learnt; set or clear them in the review UI[/]")
    table = Table("flag", "train yes/no", "dev n", "temperature", "dev F1", "dev log-loss", title="flags (dev, calibrated)")
    for name in meta["flag_names"]:
        counts, calibration = meta["flag_decisions"][name], meta["flag_calibration"][name]
        dev = meta["flag_dev_metrics"].get(name)
        temperature = f"{meta['flag_temperatures'][name]:.3f}" + (" (failed)" if calibration["status"] == "failed" else "")
        table.add_row(name, f"{counts['train_yes']}/{counts['train_no']}", str(calibration["n_dev"]), temperature,
                      f"{dev['f1']:.3f}" if dev else "-", f"{dev['log_loss']:.3f}" if dev else "-")
    console.print(table)
    for name, calibration in meta["flag_calibration"].items():
        if calibration["status"] == "failed":
            console.print(f"[yellow]warning: calibration of flag '{name}' failed: {calibration['reason']}; "
                          "stored temperature 1.0[/]")


def _print_decision(who: str, report: dict[str, Any] | None) -> None:
    """How ``who`` writes its labels, from a `decide_by_cutoffs` report."""
    if not report or "argmax_qwk" not in report:
        return
    rule = ("cut-points on the expected grade " + ", ".join(f"{c:.2f}" for c in report["cutoffs"])
            if report["rule"] == "expected_grade_cutoffs" else "the most probable label")
    console.print(f"labels written by {who}: {rule} (dev QWK, cross-fitted: cut-points {report['cutoffs_qwk']:.3f}, "
                  f"argmax {report['argmax_qwk']:.3f})")


def _print_stack(stack: dict[str, Any] | None) -> None:
    if stack is None:
        return
    if not stack["fitted"]:
        console.print(f"[yellow]no stack fitted: {stack['reason']}[/]")
        return
    report = stack["dev_report"]
    keys = [k for k in ("accuracy", "qwk", "rmse_rating", "log_loss") if k in report["full"]]
    reads = f"; reads retriever {stack['retriever']}'s cosine" if stack.get("retriever") else ""
    table = Table("on dev", *keys, title=f"stack {stack['version']} ({report['n_dev']:,} dev pairs; stacks "
                                         f"cross-validated by query{reads})")
    for name, part in (("adapter alone", "adapter"), ("stack without the LLM", "lexical_only"), ("stack", "full")):
        table.add_row(name, *(f"{report[part][k]:.3f}" for k in keys))
    console.print(table)
    colour = "green" if report["llm_adds"] else "yellow"
    console.print(f"[{colour}]{report['verdict']}[/]; mnr label applies the stack (--no-stack: the bare adapter)")
    _print_decision("the stack", report.get("decision"))
    for name, flag in (stack.get("flag_dev_report") or {}).items():
        if not flag["fitted"]:
            console.print(f"[yellow]flag '{name}': no stack regression: {flag['reason']}[/]")
            continue
        console.print(f"flag '{name}' on dev ({flag['n_dev']} decisions, {flag['positives']} yes; F1 at 0.5): LLM alone "
                      f"{flag['llm_alone']['f1']:.3f}, stack without the LLM {flag['lexical_only']['f1']:.3f}, "
                      f"stack {flag['full']['f1']:.3f}; {flag['verdict']}")


def _print_path(meta: dict[str, Any]) -> None:
    info = meta["training_path"]
    if info["path"] == "cached":
        console.print(f"layer cache: {info['train_pairs_cached']:,} train pairs ({info['train_tokens_cached']:,} tokens, "
                      f"{info['cache_bytes'] / 2**20:,.0f} MiB {info['cache_dtype']}"
                      f"{', spilled to disk' if info['cache_spilled'] else ''}) in {info['train_encode_and_cache_seconds']:.0f}s "
                      f"({info['train_cache_pairs_per_s']:.1f} pairs/s); top {info['top_k']} blocks trained, "
                      f"arithmetic in {info.get('compute_dtype', 'torch.float32').removeprefix('torch.')}")
    console.print(f"{meta['pairs_seen']:,} pairs seen over {meta['n_train_used']:,} distinct: {meta['epochs']:.2f} epochs")
    head = meta.get("answer_head") or {}
    if "dev_by_l2" in head:
        metric = head["metric"]
        kept = head["dev_by_l2"].get(f"{head['l2']:g}") if head["used"] else None
        if kept is not None:
            verdict = f"kept (penalty {head['l2']:g}): dev {metric} {kept:.3f}"
        elif head.get("best_l2") is not None:
            verdict = (f"not kept: the best (penalty {head['best_l2']:g}) beat the adapter without it in only "
                       f"{head['p_better']:.0%} of dev resamples")
        else:
            verdict = "not kept: no penalty beat the adapter without it"
        console.print(f"answer head on {head['train_pairs']:,} train pairs, {verdict}; without it "
                      f"{head['dev_without_head']:.3f} ({head['seconds']:.0f}s)")


def _print_progress(record: dict[str, Any]) -> None:
    best = " [green]best[/]" if record.get("best") else ""
    console.print(f"step {record['step']:>5} epoch {record['epoch']:.2f} | train loss {record['train_loss']:.4f} | "
                  f"dev acc {record['accuracy']:.3f} macro-F1 {record['macro_f1']:.3f} QWK {record['qwk']:.3f} "
                  f"log-loss {record['log_loss']:.3f} ECE {record['ece']:.3f} | {record['elapsed_s']:.0f}s{best}")


# -- mnr eval-labeler ---------------------------------------------------------------------------------
def read_prediction_file(path: Path, scheme: LabelScheme) -> pd.DataFrame:
    """A file of labeler output: columns pair_id, label and optionally probs (JSON object) or p_<label> columns.

    Returns pair_id, label, probs (dict or None). Raises `MnrError` naming the row and field of a bad value.
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise MnrError(f"{path}: no such file")
    if suffix == ".csv":
        frame = pd.read_csv(path, dtype={"pair_id": str})
    elif suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=suffix == ".jsonl", dtype={"pair_id": str})
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise MnrError(f"{path}: unknown file type '{suffix}' (use {', '.join(FILE_SUFFIXES)})")
    missing = [c for c in ("pair_id", "label") if c not in frame.columns]
    if missing:
        raise MnrError(f"{path}: missing column(s) {', '.join(missing)}; the file has: {', '.join(map(str, frame.columns))}")
    prob_columns = {name: f"p_{name}" for name in scheme.label_names if f"p_{name}" in frame.columns}
    rows = []
    for number, row in enumerate(frame.to_dict("records"), start=1 + (suffix == ".csv")):
        try:
            label = scheme.normalize(row["label"])
        except MnrError as exc:
            raise MnrError(f"{path}: row {number}, field 'label': {exc}") from exc
        probs = _row_probs(path, number, row, prob_columns, scheme)
        rows.append({"pair_id": str(row["pair_id"]), "label": label, "probs": probs})
    return pd.DataFrame(rows, columns=["pair_id", "label", "probs"])


def _row_probs(path: Path, number: int, row: dict, prob_columns: dict[str, str], scheme: LabelScheme) -> dict | None:
    if prob_columns:
        if len(prob_columns) != len(scheme.label_names):
            raise MnrError(f"{path}: has p_ columns for {', '.join(prob_columns)} but not for every label of "
                           f"scheme '{scheme.name}' ({', '.join(scheme.label_names)})")
        return {name: float(row[column]) for name, column in prob_columns.items()}
    value = row.get("probs")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise MnrError(f"{path}: row {number}, field 'probs': not a JSON object ({exc})") from exc
    if not isinstance(value, dict):
        raise MnrError(f"{path}: row {number}, field 'probs': expected an object {{label: probability}}")
    try:
        return {scheme.normalize(k): float(v) for k, v in value.items()}
    except (MnrError, TypeError, ValueError) as exc:
        raise MnrError(f"{path}: row {number}, field 'probs': {exc}") from exc


def probability_matrix(predictions: pd.DataFrame, scheme: LabelScheme) -> np.ndarray:
    """(n, K) label probabilities in scheme order; a prediction without probabilities is one-hot."""
    names = scheme.label_names
    matrix = np.zeros((len(predictions), len(names)))
    for i, (label, probs) in enumerate(zip(predictions["label"], predictions["probs"])):
        if isinstance(probs, str):
            probs = json.loads(probs)
        if probs:
            matrix[i] = [float(probs.get(name, 0.0)) for name in names]
            total = matrix[i].sum()
            if total <= 0:
                raise MnrError(f"pair {predictions['pair_id'].iloc[i]}: its probabilities sum to {total}")
            matrix[i] /= total
        else:
            matrix[i, names.index(scheme.normalize(label))] = 1.0
    return matrix


def _infer_scheme(store: Any) -> str:
    schemes = [row[0] for row in store.fetchall("SELECT DISTINCT scheme FROM labels ORDER BY scheme")]
    if len(schemes) != 1:
        raise MnrError(f"pass --scheme: the store has labels of {len(schemes)} schemes ({', '.join(schemes) or 'none'})")
    return schemes[0]


def eval_labeler_command(
    labels: str = typer.Option(..., "--labels", help="Labeler output: llm, import, human, audit, or a CSV/JSONL/Parquet "
                                                     "file with pair_id, label [, probs | p_<label> columns]."),
    against: str = typer.Option("human", "--against", help="Reference labels: human, import, or human,import."),
    scheme_name: Optional[str] = typer.Option(None, "--scheme", help="Label scheme (default: the store's only one)."),
    run_id: Optional[str] = typer.Option(None, "--run", help="Only labels written by this run (store sources)."),
    author: Optional[str] = typer.Option(None, "--author", help="Only labels by this author (store sources)."),
    split_of: Optional[Path] = typer.Option(None, "--split-of",
                                            help="Adapter folder: evaluate only on its dev queries (split.json), "
                                                 "or on its dev pairs when it was trained with --dev-split pair."),
    out: Path = typer.Option(Path("labeler-eval"), "--out", help="Folder for metrics.json, PNGs and report.html."),
    bins: int = typer.Option(10, "--bins", help="Bins of the reliability diagram / ECE."),
) -> None:
    """Evaluate labeler output against human labels: accuracy, macro-F1, kappa/QWK, RMSE, ECE, confusion."""
    from annotator.evaluation import evaluate_labels, labelled_pairs, write_report

    if labels == against:
        raise MnrError("--labels and --against name the same source: that compares the labels with themselves")
    store = open_store()
    scheme = load_scheme(scheme_name or _infer_scheme(store))
    reference = labelled_pairs(store, scheme.name, _parse_sources(against, "--against"))
    if labels in STORE_SOURCES:
        predictions = labelled_pairs(store, scheme.name, [labels], run_id=run_id, author=author)[["pair_id", "label", "probs"]]
        origin = f"store labels, source '{labels}'" + (f", run {run_id}" if run_id else "") + (f", author {author}" if author else "")
    else:
        path = Path(labels)
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise MnrError(f"--labels '{labels}': not a store source ({', '.join(STORE_SOURCES)}) nor a "
                           f"{', '.join(FILE_SUFFIXES)} file")
        predictions = read_prediction_file(path, scheme)
        origin = f"file {path}"
    if split_of is not None:
        split_path = split_of / "split.json"
        if not split_path.is_file():
            raise MnrError(f"--split-of {split_of}: no split.json there (written by `mnr finetune`)")
        split = json.loads(split_path.read_text())
        if split.get("dev_split", "query") == "pair":  # dev queries have train pairs: only the dev pairs are unseen
            reference = reference[reference["pair_id"].isin(set(split["dev_pair_ids"]))]
        else:
            reference = reference[reference["query_id"].isin(set(split["dev_query_ids"]))]
    joined = reference.merge(predictions, on="pair_id", suffixes=("_ref", ""))
    if joined.empty:
        raise MnrError(f"no pair has both a {origin} label and a '{against}' label of scheme '{scheme.name}' "
                       f"({len(predictions):,} predictions, {len(reference):,} reference labels)")
    names = scheme.label_names
    y_true = np.array([names.index(label) for label in joined["label_ref"]])
    chosen = np.array([names.index(scheme.normalize(label)) for label in joined["label"]])  # the labels as written
    metrics = evaluate_labels(y_true, probability_matrix(joined, scheme), [scheme.grades[n] for n in names],
                              joined["raw_rating"].to_numpy(dtype=float), label_names=names,
                              rating_scale=rating_scale_for(joined, scheme), n_bins=bins, chosen=chosen)
    metrics.update({"labels_source": origin, "against": against, "scheme": scheme.name,
                    "unmatched_predictions": int(len(predictions) - len(joined))})
    with store.run("eval-labeler", {"labels": labels, "against": against, "scheme": scheme.name, "run": run_id,
                                    "author": author, "split_of": str(split_of) if split_of else None}) as run:
        paths = write_report(metrics, out, title=f"Labeler evaluation: {labels} against {against}",
                             description=f"{origin}; reference: {against} labels; scheme {scheme.name}; "
                                         f"{metrics['n']:,} pairs.")
        run.metrics.update({k: metrics[k] for k in ("n", "accuracy", "macro_f1", "qwk", "ece") if k in metrics})
    _print_metrics(metrics)
    console.print(f"wrote {paths['json']} and {paths['html']}")


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table("metric", "value", title=f"{metrics['labels_source']} vs {metrics['against']} ({metrics['n']:,} pairs)")
    for key in ("accuracy", "macro_f1", "kappa", "qwk", "within_one_accuracy", "rmse_grade", "rmse_rating", "log_loss", "ece"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
    app.command("eval-labeler")(eval_labeler_command)
