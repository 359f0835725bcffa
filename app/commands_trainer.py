"""`mnr train stage1|stage2`, `mnr mine`, `mnr eval-retrieval`, `mnr augment`: the trainer area's commands."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from app.context import console, err_console, open_store
from labelstore.config import section
from labelstore.errors import MnrError

train_app = typer.Typer(help="Train the two-tower retriever: stage1 (label-aware SupCon), stage2 (multi-class circle loss).",
                        no_args_is_help=True)

# fewer held-out queries than this and `mnr bands` warns: one halving of 150 Home Depot queries already moved a
# threshold's precision by up to 10 points (docs/trainer.md, Benchmarks)
MIN_BAND_QUERIES = 20
FIELDS_HELP = "Product fields the product text is built from (repeatable): title, description, brand, attributes."


def _parse_margins(items: List[str]) -> dict[int, float]:
    margins = {}
    for item in items:
        try:
            gap, value = item.split("=", 1)
            margins[int(gap)] = float(value)
        except ValueError as exc:
            raise MnrError(f"--gap-margin '{item}' is not GAP=MARGIN, e.g. 2=0.25") from exc
    return margins


def _train(stage: str, scheme: str, dataset: Optional[str], start_from: Optional[str], out: Optional[Path],
           epochs: int, max_steps: Optional[int], queries_per_batch: int, products_per_query: int, lr: float,
           max_seq_length: int, holdout: float, seed: int, fields: List[str], separate_towers: bool,
           temperature: float, gamma: float, margin: float, gap_margins: List[str], checkpoint_every: int,
           product_anchors: bool = False, hard_negatives: int = 0, hard_negative_pool: int = 30,
           hard_negative_margin: float = 0.05, relabelled: bool = False, confidence_floor: float = 0.5) -> None:
    from trainer.registry import resolve_model
    from trainer.train import TrainConfig, run_training

    defaults = section("trainer")
    config = TrainConfig(stage=stage, scheme=scheme, dataset=dataset, epochs=epochs, max_steps=max_steps,
                         queries_per_batch=queries_per_batch, products_per_query=products_per_query,
                         learning_rate=lr, max_seq_length=max_seq_length, holdout_fraction=holdout, seed=seed,
                         product_fields=tuple(fields or defaults.get("product_fields", ("title", "description"))),
                         separate_towers=separate_towers, temperature=temperature, gamma=gamma, margin=margin,
                         margins=_parse_margins(gap_margins), checkpoint_every=checkpoint_every,
                         product_anchors=product_anchors, hard_negatives=hard_negatives,
                         hard_negative_pool=hard_negative_pool, hard_negative_margin=hard_negative_margin)
    store = open_store()
    parent_id, start_path = resolve_model(store, start_from) if start_from else (None, None)
    relabels = None
    if relabelled and stage != "stage2":
        raise MnrError("--relabelled trains Stage 2 only (Stage 1 learns from the human labels)")
    if relabelled:
        from app.relabel import relabelled_mined_pairs

        relabels, queued = relabelled_mined_pairs(store, scheme, dataset, floor=confidence_floor)
        console.print(f"relabelled mined pairs: {len(relabels.pair_ids)} at confidence >= {confidence_floor:.2f} train "
                      f"with it as weight; {queued} below it queued for review, not trained on")
    model_id, result = run_training(store, config, start_from=start_path, parent_model_id=parent_id, out=out,
                                    relabels=relabels)
    metrics = result.metrics
    console.print(f"{stage}: trained {int(metrics['steps'])} steps on {int(metrics['train_pairs_seen'])} pairs "
                  f"({metrics['train_pairs_per_s']:.1f} pairs/s, {metrics['train_wall_s']:.0f} s); "
                  f"saved {result.path}; registered [bold]{model_id}[/]")
    if metrics.get("hard_negatives_added"):
        console.print(f"hard negatives: {int(metrics['hard_negatives_added'])} unlabelled near neighbours trained on as "
                      "the lowest grade")
    if "heldout_ndcg@10" in metrics:
        console.print(f"held-out: ndcg@10 {metrics['heldout_ndcg@10']:.4f}, recall@100 {metrics['heldout_recall@100']:.4f}, "
                      f"mrr {metrics['heldout_mrr']:.4f} over {int(metrics['heldout_n_queries'])} queries")


def _options(stage: str):
    def command(
        scheme: str = typer.Option("esci", "--scheme", help="Label scheme whose grades are trained on."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Only this dataset's pairs (and products)."),
        start_from: Optional[str] = typer.Option(
            None if stage == "stage1" else "latest-stage1", "--from",
            help="Start model: a model id, 'zero-shot', 'latest-stage1', or a folder (stage1 default: all-MiniLM-L6-v2)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: models/<stage>-<run> beside the store)."),
        epochs: int = typer.Option(1, "--epochs"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many batches."),
        queries_per_batch: int = typer.Option(16, "--queries-per-batch"),
        products_per_query: int = typer.Option(8, "--products-per-query"),
        lr: float = typer.Option(3e-5, "--lr"),
        max_seq_length: int = typer.Option(64, "--max-seq-length"),
        holdout: float = typer.Option(0.2, "--holdout", help="Share of queries held out (query-disjoint, by hash)."),
        seed: int = typer.Option(0, "--seed"),
        fields: List[str] = typer.Option([], "--field", help=FIELDS_HELP),
        separate_towers: bool = typer.Option(False, "--separate-towers", help="Separate query and product encoders."),
        temperature: float = typer.Option(0.05, "--temperature", help="Stage 1 SupCon temperature."),
        product_anchors: bool = typer.Option(
            False, "--product-anchors",
            help="Stage 1: products anchor too, so same-grade products pull each other (default: queries only)."),
        gamma: float = typer.Option(32.0, "--gamma", help="Stage 2 circle-loss scale."),
        margin: float = typer.Option(0.1, "--margin", help="Stage 2 margin per unit of grade gap."),
        gap_margins: List[str] = typer.Option([], "--gap-margin", help="Stage 2 margin for one grade gap, GAP=MARGIN (repeatable)."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Checkpoint every N steps (resume by re-running with the same --out)."),
        hard_negatives: int = typer.Option(
            0, "--hard-negatives",
            help="Per query, add this many of its nearest unlabelled products (under the start model) as lowest-grade pairs."),
        hard_negative_pool: int = typer.Option(30, "--hard-negative-pool", help="Nearest products searched per query for them."),
        hard_negative_margin: float = typer.Option(
            0.05, "--hard-negative-margin",
            help="Keep a hard negative only if it scores <= (1 - margin) x the query's best positive (likely-relevant ones are skipped)."),
        relabelled: bool = typer.Option(
            False, "--relabelled",
            help="Stage 2: mined pairs relabelled by the LLM train with its confidence as weight; those below "
                 "--confidence-floor go to the review queue instead."),
        confidence_floor: float = typer.Option(0.5, "--confidence-floor", help="With --relabelled: the floor."),
    ) -> None:
        _train(stage, scheme, dataset, start_from, out, epochs, max_steps, queries_per_batch, products_per_query, lr,
               max_seq_length, holdout, seed, fields, separate_towers, temperature, gamma, margin, gap_margins,
               checkpoint_every, product_anchors, hard_negatives, hard_negative_pool,
               hard_negative_margin, relabelled, confidence_floor)

    command.__doc__ = ("Stage 1: label-aware supervised contrastive training (same grade attracts, other grades "
                       "and in-batch products repel)." if stage == "stage1" else
                       "Stage 2: multi-class circle loss on the store's current labels (incl. LLM relabels), "
                       "starting from a Stage 1 model.")
    return command


train_app.command("stage1")(_options("stage1"))
train_app.command("stage2")(_options("stage2"))


def mine(
    model: str = typer.Option("latest-stage1", "--model", help="Model id, 'zero-shot', 'latest-stage1|2', or a folder."),
    scheme: str = typer.Option("esci", "--scheme"),
    dataset: Optional[str] = typer.Option(None, "--dataset"),
    top_k: int = typer.Option(50, "--top-k", help="Neighbours searched per query."),
    band: Optional[str] = typer.Option(None, "--band", help="Ambiguous similarity band LOW,HIGH (default: from the labelled pairs)."),
    per_query: int = typer.Option(5, "--per-query", help="Ambiguous unlabelled pairs kept per query."),
    high_rank: int = typer.Option(10, "--high-rank", help="A lowest-grade pair ranked at or above this is flagged."),
    low_rank: Optional[int] = typer.Option(None, "--low-rank", help="A top-grade pair ranked below this is flagged (default top-k/2)."),
    index: str = typer.Option("auto", "--index", help="auto (exact up to --exact-threshold, IVF above), flat, ivf, hnsw."),
    exact_threshold: int = typer.Option(100_000, "--exact-threshold"),
) -> None:
    """Mine hard pairs with faiss and write them as mining candidates for the annotator to relabel."""
    from trainer.mining import MiningConfig, mine as run_mining
    from trainer.model import TwoTowerModel
    from trainer.registry import resolve_model

    parsed_band = None
    if band:
        try:
            low, high = (float(x) for x in band.split(","))
        except ValueError as exc:
            raise MnrError(f"--band '{band}' is not LOW,HIGH, e.g. 0.45,0.7") from exc
        parsed_band = (low, high)
    store = open_store()
    model_id, path = resolve_model(store, model)
    retriever = TwoTowerModel.from_pretrained(path)
    config = MiningConfig(top_k=top_k, band=parsed_band, per_query=per_query, high_rank=high_rank, low_rank=low_rank,
                          index_kind=index, exact_threshold=exact_threshold)
    run_id, candidates, metrics = run_mining(store, retriever, scheme, dataset, config, model_id)
    counts = candidates["reason"].value_counts().to_dict()
    console.print(f"mine {run_id}: {metrics['index_kind']} index over {metrics['n_products']:,} products, "
                  f"{metrics['n_queries']:,} queries, band [{metrics['band_low']:.3f}, {metrics['band_high']:.3f}]")
    console.print(f"candidates: {json.dumps(counts)}; new pairs {metrics['inserted_pairs']}, "
                  f"candidate rows {metrics['inserted_mining_candidates']}")


def eval_retrieval(
    models: List[str] = typer.Option([], "--model", help="Model to evaluate (repeatable): id, 'zero-shot', 'latest-stage1|2', folder."),
    scheme: str = typer.Option("esci", "--scheme"),
    dataset: Optional[str] = typer.Option(None, "--dataset"),
    holdout: float = typer.Option(0.2, "--holdout", help="Same split as training: share of queries held out."),
    seed: int = typer.Option(0, "--seed"),
    bm25: bool = typer.Option(True, "--bm25/--no-bm25", help="Include the BM25 baseline."),
    zero_shot: bool = typer.Option(True, "--zero-shot/--no-zero-shot", help="Include zero-shot MiniLM."),
    record: bool = typer.Option(True, "--record/--no-record", help="Store each model's metrics in models.metrics."),
    hybrid: bool = typer.Option(
        False, "--hybrid",
        help="Blend BM25 with the last --model (default zero-shot): held-out queries split into dev (bands, blend "
             "weight) and test (the table)."),
    exclude_flagged: bool = typer.Option(
        False, "--exclude-flagged",
        help="Also evaluate every system with the flagged products filtered out of its rankings (rows '... (flagged "
             "excluded)'), beside the unfiltered ones."),
    flag_threshold: float = typer.Option(
        0.5, "--flag-threshold", min=0.0, max=1.0,
        help="A product is flagged when a current label of one of its pairs flags it: the human decision, else the "
             "labeler's probability at or above this."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Rank the dataset's whole product set for held-out queries: graded NDCG@10, Recall@100, MRR, band AUCs,
    and the flagged products each system puts in the top 10 (flagged@10: mean per query; _total: the sum)."""
    from labelstore.flags import flagged_product_ids
    from trainer.data import load_labelled_pairs, load_products
    from trainer.evaluation import evaluate_systems, paired_p_values, reports_table
    from trainer.model import TwoTowerModel
    from trainer.registry import record_metrics, resolve_model, split_mismatch

    if hybrid and not bm25:
        raise typer.BadParameter("--hybrid blends BM25 with a model: drop --no-bm25", param_hint="--no-bm25")
    names = (["zero-shot"] if zero_shot else []) + [m for m in models if m != "zero-shot"]
    if hybrid and not names:
        raise typer.BadParameter("--hybrid blends BM25 with the last --model: give one, or drop --no-zero-shot",
                                 param_hint="--model")
    if not (bm25 or names):
        raise typer.BadParameter("nothing to evaluate: give --model, or drop --no-bm25 / --no-zero-shot",
                                 param_hint="--model")
    store = open_store()
    flagged = flagged_product_ids(store, threshold=flag_threshold)
    loaded: dict[str, tuple[str | None, TwoTowerModel]] = {}
    for name in names:
        model_id, path = resolve_model(store, name)
        loaded[model_id or name] = (model_id, TwoTowerModel.from_pretrained(path))
    fields = next(iter(loaded.values()))[1].product_fields if loaded else ("title", "description")
    _, held_out = load_labelled_pairs(store, scheme, dataset, fields).split(holdout, seed)
    if held_out.frame.empty:
        raise MnrError("no held-out queries: raise --holdout, or try another --seed")
    leaks = {model_id: why for model_id, _ in loaded.values()
             if (why := split_mismatch(store, model_id, holdout=holdout, seed=seed))}
    for why in leaks.values():
        err_console.print(f"[yellow]warning:[/] {why}"
                          + ("; its held-out metrics are not recorded" if record and not hybrid else ""))
    products = load_products(store, dataset, fields)
    flagged = flagged & frozenset(products["product_id"])
    flag_options = {"flagged": flagged, "exclude_flagged": exclude_flagged}
    flag_params = {"exclude_flagged": exclude_flagged, "flag_threshold": flag_threshold, "n_flagged_products": len(flagged)}
    if hybrid:
        name, (_, model) = next(reversed(loaded.items()))
        split_params = {"scheme": scheme, "dataset": dataset, "holdout": holdout, "seed": seed}
        _eval_hybrid(store, name, model, held_out, products, split_params, as_json, flag_options, flag_params)
        return
    systems = ({"bm25": None} if bm25 else {}) | {name: model for name, (_, model) in loaded.items()}
    params = {"scheme": scheme, "dataset": dataset, "holdout": holdout, "seed": seed, "systems": list(systems),
              **flag_params}
    with store.run("eval-retrieval", params) as run:
        reports = evaluate_systems(held_out, products, systems, **flag_options)
        run.metrics.update({r.system: r.as_dict() for r in reports})
    if record:
        for report in reports:
            model_id = loaded.get(report.system, (None, None))[0]
            if model_id and model_id not in leaks:
                record_metrics(store, model_id, {f"heldout_{k}": v for k, v in report.metrics.items()}
                               | {f"heldout_auc_{k}": v for k, v in report.adjacent_auc.items()})
    if as_json:
        console.print_json(json.dumps([r.as_dict() for r in reports]))
        return
    baseline = "retriever-zero-shot-minilm" if zero_shot else None
    p_values = paired_p_values(held_out, reports, baseline) if baseline and len(reports) > 1 else None
    table_frame = reports_table(reports, baseline, p_values)
    table = Table(*table_frame.columns, title=f"Retrieval on {int(reports[0].metrics['n_queries'])} held-out queries, "
                                              f"{int(reports[0].metrics['n_products']):,} products")
    for row in table_frame.itertuples(index=False):
        table.add_row(*(_cell(value) for value in row))
    console.print(table)
    _print_left_out(int(reports[0].metrics["n_queries_left_out"]), scheme=held_out.scheme)
    if p_values is not None:
        console.print("lift and p: relative NDCG@10 over zero-shot MiniLM, and the two-sided paired t-test of "
                      "per-query NDCG@10 against it (ranx)")
    _print_flag_note(flag_params)


def _print_flag_note(flag_params: dict) -> None:
    console.print(f"flagged@10: flagged products in a query's top 10, mean per query (_total: summed over the queries); "
                  f"{flag_params['n_flagged_products']:,} products flagged in the catalog (human decision first, else "
                  f"probability >= {flag_params['flag_threshold']:g})"
                  + ("; '(flagged excluded)' rows rank with them filtered out" if flag_params["exclude_flagged"] else ""))


def _print_left_out(n_left_out: int, *, scheme) -> None:
    if n_left_out:
        console.print(f"{n_left_out:,} held-out {'query has' if n_left_out == 1 else 'queries have'} every pair "
                      f"labelled '{scheme.lowest_label}': nothing to find, so left out of the metrics")


def _eval_hybrid(store, name: str, model, held_out, products, split_params: dict, as_json: bool, flag_options: dict,
                 flag_params: dict) -> None:
    from trainer.evaluation import dev_test_split, evaluate_hybrid, reports_table

    dev, test = dev_test_split(held_out, split_params["seed"])
    if dev.frame.empty or test.frame.empty:
        n_queries = held_out.frame["query_id"].nunique()
        raise MnrError(f"--hybrid splits the {n_queries} held-out {'query' if n_queries == 1 else 'queries'} into dev "
                       "and test, and one side is empty: raise --holdout, or try another --seed")
    with store.run("eval-hybrid", {"model": name, **split_params, **flag_params}) as run:
        reports, info = evaluate_hybrid(model, dev, test, products, **flag_options)
        run.metrics.update({"systems": [r.as_dict() for r in reports], **info})
    if as_json:
        console.print_json(json.dumps({"model": name, "systems": [r.as_dict() for r in reports], **info, **flag_params},
                                      default=str))
        return
    frame = reports_table(reports, "neural")
    table = Table(*frame.columns, title=f"Hybrid retrieval, {name}: {info['n_test_queries']} test queries "
                                        f"({info['n_dev_queries']} dev), {len(products):,} products")
    for row in frame.itertuples(index=False):
        table.add_row(*(_cell(value) for value in row))
    console.print(table)
    _print_left_out(int(info["n_queries_left_out"]), scheme=held_out.scheme)
    console.print(f"calibrated blend: {info['calibrated_weight']:.2f} x the expected grade given the similarity (dev "
                  f"bands, scaled to [0, 1]) + {1 - info['calibrated_weight']:.2f} x BM25 (min-max); tuned min-max "
                  f"weight {info['minmax_weight']:.2f}. --hybrid records no model metrics")
    _print_flag_note(flag_params)


def bands(
    model: str = typer.Option(..., "--model", help="Model id, 'zero-shot', 'latest-stage1|2', or a folder (not stored)."),
    scheme: str = typer.Option("esci", "--scheme"),
    dataset: Optional[str] = typer.Option(None, "--dataset"),
    holdout: float = typer.Option(0.2, "--holdout", help="Same split as training: the bands are fitted on the held-out queries."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fit score bands: per-grade similarity thresholds and a calibrated P(grade >= g | score), stored with the model."""
    from trainer.data import load_labelled_pairs
    from trainer.evaluation import model_bands
    from trainer.model import TwoTowerModel
    from trainer.registry import resolve_model, save_bands, split_mismatch

    store = open_store()
    model_id, path = resolve_model(store, model)
    retriever = TwoTowerModel.from_pretrained(path)
    _, held_out = load_labelled_pairs(store, scheme, dataset, retriever.product_fields).split(holdout, seed)
    if held_out.frame.empty:
        raise MnrError("no held-out queries: raise --holdout, or try another --seed")
    if why := split_mismatch(store, model_id, holdout=holdout, seed=seed):
        err_console.print(f"[yellow]warning:[/] {why}; bands fitted on training queries separate the grades better "
                          "than on new ones")
    n_queries = held_out.frame["query_id"].nunique()
    if n_queries < MIN_BAND_QUERIES:
        err_console.print(f"[yellow]warning:[/] bands fitted on {n_queries} held-out "
                          f"{'query' if n_queries == 1 else 'queries'} ({len(held_out.frame)} pairs): thresholds this "
                          f"close to the data do not carry over; hold out at least {MIN_BAND_QUERIES} (--holdout)")
    fitted_on = {"scheme": scheme, "dataset": dataset, "holdout": holdout, "seed": seed, "n_queries": n_queries,
                 "n_pairs": len(held_out.frame)}
    with store.run("bands", {"model": model_id or str(path), **fitted_on}) as run:
        fitted, report = model_bands(retriever, held_out, seed=seed)
        report = {**report, "fitted_on": fitted_on}
        run.metrics.update(report)
    if model_id:
        save_bands(store, model_id, fitted, report)
    if as_json:
        console.print_json(json.dumps({"model": model_id, "bands": fitted.to_dict(), "report": report}, default=str))
        return
    _print_bands(report, model_id or str(path))


def _print_bands(report: dict, name: str) -> None:
    table = Table("boundary", "thr", "prec", "rec", "AUC", "ovl", "prec B", "gap", "mean gap", "head", "tail",
                  title=f"Score bands of {name}: {report['n_pairs']:,} held-out pairs, {report['n_queries']:,} queries")
    for boundary, precision in report["precision"].items():
        half = report["split_half"][boundary]
        head_tail = report["head_tail"]
        table.add_row(boundary, _cell(precision["threshold"]), _cell(precision["precision"]), _cell(precision["recall"]),
                      _cell(report["adjacent_auc"].get(boundary, float("nan"))),
                      _cell(report["adjacent_overlap"].get(boundary, float("nan"))),
                      _cell(half["precision_other"]), _cell(half["gap"]),
                      _cell(report.get("split_half_repeated", {}).get(boundary, {}).get("mean_gap", float("nan"))),
                      *(_cell(head_tail.get(group, {}).get(boundary, {}).get("precision", float("nan")))
                        for group in ("head", "tail")))
    console.print(table)
    grades = Table("grade", *next(iter(report["distributions"].values())).keys(), title="Similarity per grade")
    for grade, stats in report["distributions"].items():
        grades.add_row(grade, *(_cell(float(v)) if isinstance(v, float) else str(v) for v in stats.values()))
    console.print(grades)
    console.print("thr: the threshold for grade >= upper (maximises TPR - FPR); prec / rec: precision and recall there; "
                  "ovl: overlap of the two grades' scores; prec B: thresholds fitted on half A of the queries, precision on "
                  "half B; gap: |prec A - prec B|; mean gap: over 20 random halvings; head / tail: precision on the half of the queries with the most / "
                  "fewest judged pairs")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def augment(
    dataset: str = typer.Option(..., "--dataset", help="Dataset whose queries get noisy copies."),
    rate: float = typer.Option(0.05, "--rate", help="Edits per letter (swap, delete, insert, keyboard substitution)."),
    seed: int = typer.Option(0, "--seed"),
    copies: int = typer.Option(1, "--copies", help="Noisy variants per query."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Copy only this scheme's labels."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries"),
) -> None:
    """Add spelling-noise copies of queries (marked synthetic) that inherit their source's labels."""
    from trainer.augment import augment_with_noise

    written = augment_with_noise(open_store(), dataset, rate, seed, copies, scheme, max_queries)
    console.print("augment: added " + ", ".join(f"{n} {table}" for table, n in written.items()))


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""
    app.add_typer(train_app, name="train")
    app.command()(mine)
    app.command("eval-retrieval")(eval_retrieval)
    app.command()(bands)
    app.command()(augment)
