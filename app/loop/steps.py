"""The eleven steps of the Mine and Refine loop, each a `Step` record: name, function, the keys of its
`[loop.<step>]` table, and the top-level config tables it reads. The machinery is `app.loop.runner`.

Each step imports its area (trainer, annotator, auditor) when it runs, so `mnr --help` stays fast.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from app.loop.runner import LoopConfig, Step, StepContext
from labelstore.errors import MnrError
from labelstore.sqlfiles import sql
from labelstore.store import Store


def _count_pairs(store: Store, dataset: str) -> int:
    return int(store.scalar(sql("app.loop", "count_pairs"), {"dataset": dataset}) or 0)


def step_ingest(ctx: StepContext) -> dict[str, Any]:
    """Bring labelled pairs into the store: a generated catalog, a file (optionally sampled), or nothing."""
    options = ctx.options
    source = str(options.get("source", "catalog"))
    dataset = ctx.config.dataset
    if source == "catalog":
        from labelstore.catalog import generate_catalog, write_catalog

        if ctx.config.scheme != "esci":
            raise MnrError(f"{ctx.config.where}: the generated catalog is labelled in scheme 'esci', "
                           f"but [loop] scheme = '{ctx.config.scheme}'")
        catalog = generate_catalog(n_families=int(options.get("n_families", 12)), seed=int(options.get("seed", 0)),
                                   dataset=dataset)
        inserted = write_catalog(ctx.store, catalog, dataset=dataset)
        rows = len(catalog.judgments)
    elif source == "file":
        from labelstore.ingest import PRESETS, ingest_file

        if "path" not in options:
            raise MnrError(f"{ctx.config.where}: [loop.ingest] source = 'file' needs a `path`")
        path = ctx.config.resolve(str(options["path"]))
        preset = options.get("preset")
        expected = PRESETS[preset].scheme if preset in PRESETS else options.get("scheme", ctx.config.scheme)
        if expected != ctx.config.scheme:
            raise MnrError(f"{ctx.config.where}: [loop.ingest] gives scheme '{expected}' but [loop] scheme = "
                           f"'{ctx.config.scheme}'; make them the same")
        if int(options.get("sample_queries", 0)) > 0:
            from labelstore.sampling import sample_by_query

            path = sample_by_query(path, preset, int(options["sample_queries"]), int(options.get("seed", 0)),
                                   ctx.workspace / "data", options.get("encoding"))
        result = ingest_file(ctx.store, path, preset=preset, scheme=ctx.config.scheme, dataset=dataset,
                             encoding=options.get("encoding"))
        inserted, rows = result.inserted, result.rows_read
    elif source == "store":
        inserted, rows = {}, 0
    else:
        raise MnrError(f"{ctx.config.where}: [loop.ingest] source must be 'catalog', 'file' or 'store', not '{source}'")
    pairs = _count_pairs(ctx.store, dataset)
    if pairs == 0:
        raise MnrError(f"{ctx.store.path}: no pairs of dataset '{dataset}' after ingest; check [loop] dataset")
    return {"source": source, "dataset": dataset, "scheme": ctx.config.scheme, "pairs": pairs,
            "inserted": inserted, "items": rows, "unit": "rows"}


def _dataclass_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that are fields of dataclass `cls` (`validate_config` rejected the rest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def _train(ctx: StepContext, stage: str, start_from: str | None, parent_model_id: str | None) -> dict[str, Any]:
    from trainer.train import TrainConfig, run_training

    values = {**_dataclass_values(TrainConfig, ctx.options), **_shared_split(ctx)}
    config = TrainConfig(stage=stage, scheme=ctx.config.scheme, dataset=ctx.config.dataset, **values)
    # A fixed folder per loop run and stage: a re-run of a failed step resumes from its checkpoint.
    out = ctx.workspace / "models" / f"{stage}-{ctx.loop_run_id}"
    model_id, result = run_training(ctx.store, config, start_from=start_from, parent_model_id=parent_model_id,
                                    out=out, evaluate=False, show_progress=False)
    return {"model_id": model_id, "path": str(result.path), "steps": result.steps,
            "train_pairs_per_s": round(result.metrics.get("train_pairs_per_s", 0.0), 2),
            "loss_first": result.metrics.get("loss_first"), "loss_last20": result.metrics.get("loss_last20"),
            "items": int(result.metrics.get("train_pairs_seen", 0)), "unit": "pairs"}


def _shared_split(ctx: StepContext) -> dict[str, Any]:
    """The held-out split every step agrees on: [loop] holdout_fraction and seed."""
    return {"holdout_fraction": float(ctx.config.get("holdout_fraction", 0.2)), "seed": int(ctx.config.get("seed", 0))}


def step_train_stage1(ctx: StepContext) -> dict[str, Any]:
    """Stage 1: label-aware SupCon from all-MiniLM-L6-v2 on the current labels."""
    from trainer.registry import ensure_zero_shot

    return _train(ctx, "stage1", None, ensure_zero_shot(ctx.store))


def step_mine(ctx: StepContext) -> dict[str, Any]:
    """Mine hard pairs with the Stage 1 retriever (faiss): ambiguous unlabelled and label-disputing pairs."""
    from trainer.mining import REASONS, MiningConfig, mine
    from trainer.model import TwoTowerModel

    stage1 = ctx.output("train-stage1")
    values = _dataclass_values(MiningConfig, ctx.options)
    if values.get("band") is not None:
        values["band"] = tuple(values["band"])
    model = TwoTowerModel.from_pretrained(stage1["path"])
    run_id, candidates, metrics = mine(ctx.store, model, ctx.config.scheme, ctx.config.dataset, MiningConfig(**values),
                                      model_id=stage1["model_id"])
    by_reason = {reason: int((candidates["reason"] == reason).sum()) for reason in REASONS}
    return {"mining_run_id": run_id, "candidates": int(len(candidates)), "by_reason": by_reason,
            "new_pairs": int(metrics.get("inserted_pairs", 0)), "items": int(metrics.get("n_queries", 0)),
            "unit": "queries"}


def _pull(ctx: StepContext, model: str) -> None:
    """Pull a model the annotator knows by name into its cache, once."""
    from annotator.models import PULLABLE, list_models, pull

    if model in PULLABLE and model not in list_models():
        ctx.log(f"[{ctx.step.name}] pulling {model} into the model cache (once)")
        pull(model)


def step_finetune(ctx: StepContext) -> dict[str, Any]:
    """A LoRA adapter for the relabel step from the store's human labels (the held-out queries left out),
    reused when one of the same labels, policy, base model and settings exists; and held-out pairs with
    the text baseline's agreement on them, for the relabel step to score its labeler on."""
    import time

    from annotator.prompts import load_prompt_policy
    from app.labeler_training import NoTrainingLabels, finetune_data
    from trainer.data import is_held_out

    started_at = time.monotonic()
    options, relabel = dict(ctx.options), ctx.config.options("relabel")
    if not options.get("enabled", True):
        return {"skipped": True, "reason": "[loop.finetune] enabled = false"}
    if relabel.get("adapter"):
        return {"skipped": True, "reason": "[loop.relabel] names its adapter"}
    model = str(options.get("model", relabel.get("model", "smollm2")))
    policy = load_prompt_policy(str(options.get("policy", relabel.get("policy", ctx.config.scheme))))
    sources = _sources(options.get("sources", ["human"]))
    args = _finetune_args(options)
    split = _shared_split(ctx)
    dataset = ctx.config.dataset

    def held_out(frame: Any) -> Any:
        return (frame["dataset"] == dataset) & is_held_out(frame["query_id"], split["holdout_fraction"], split["seed"])

    def trainable(frame: Any) -> Any:
        return (frame["dataset"] == dataset) & ~held_out(frame)

    try:
        data = finetune_data(ctx.store, policy, sources, args, keep=trainable)
    except NoTrainingLabels as exc:
        return {"skipped": True, "reason": f"{exc}; relabel uses the base model"}
    _pull(ctx, model)
    retriever = None
    if options.get("retriever"):
        from app.retriever_cosine import retriever_cosine

        retriever = retriever_cosine(ctx.store, str(options["retriever"]))
    found = _reusable_adapter(ctx.store, data.data_hash, policy.version, model, args,
                              retriever.name if retriever is not None else None)
    if found is None:
        outputs = _train_adapter(ctx, data, model, args, started_at, retriever)
    else:
        outputs = {**found, "reused": True, "items": 0, "unit": "pairs seen"}
        ctx.log(f"[finetune] reusing adapter {found['adapter']} (same labels, policy, base model and settings)")
    return {**outputs, "heldout": _heldout_baseline(ctx, data, held_out)}


def _sources(value: Any) -> list[str]:
    sources = [part.strip() for part in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    return [s for s in sources if s]


def _finetune_args(options: dict[str, Any]) -> Any:
    from annotator.finetune import FinetuneArgs

    values = _dataclass_values(FinetuneArgs, options)
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return FinetuneArgs(**values)


def _reusable_adapter(store: Store, data_hash: str, policy_hash: str, model: str, args: Any,
                      retriever: str | None) -> dict[str, Any] | None:
    """The newest registered adapter of these labels, policy version, base model, training settings and stack
    retriever (None: a stack without the retriever's cosine)."""
    from pathlib import Path

    from annotator.finetune import read_meta
    from app.labeler_training import ADAPTER_KIND

    for model_id, path in store.fetchall(sql("app.loop", "labeler_adapters"),
                                         {"kind": ADAPTER_KIND, "data_hash": data_hash}):
        if not (Path(path) / "meta.json").is_file():
            continue
        meta = read_meta(path)
        if (meta.get("policy_hash"), meta.get("base_model"), meta.get("training_args"),
                (meta.get("stack") or {}).get("retriever")) == (policy_hash, model, args.record(), retriever):
            return _adapter_outputs(model_id, path, meta)
    return None


def _adapter_outputs(model_id: str, path: Any, meta: dict[str, Any]) -> dict[str, Any]:
    return {"adapter": str(path), "model_id": model_id, "data_hash": meta["data_hash"], "policy": meta["policy"],
            "policy_hash": meta["policy_hash"], "train_pairs": meta["n_train_used"], "dev_pairs": meta["n_dev"],
            "steps": meta["steps"], "epochs": meta["epochs"], "stop_reason": meta["stop_reason"],
            "train_seconds": meta["train_seconds"], "dev_qwk": meta["dev_metrics"].get("qwk")}


def _train_adapter(ctx: StepContext, data: Any, model: str, args: Any, started_at: float,
                   retriever: Any = None) -> dict[str, Any]:
    """Train into a folder named by what the adapter is made of: a re-run after a crash resumes from its checkpoint."""
    import json

    from annotator.finetune import CHECKPOINT_DIR
    from app.labeler_training import run_finetune
    from labelstore.ids import stable_hash

    recipe = [data.data_hash, data.policy.version, model, json.dumps(args.record(), sort_keys=True)]
    key = stable_hash(*recipe, *([retriever.name] if retriever is not None else []), length=12)
    out = ctx.workspace / "adapters" / f"{data.policy.name}-{key}"
    resume = (out / CHECKPOINT_DIR).is_dir()
    ctx.log(f"[finetune] {len(data.train):,} train / {len(data.dev):,} dev pairs, policy '{data.policy.name}', "
            f"budget {args.max_minutes or 'unbounded'} min" + (" (resuming)" if resume else ""))

    def progress(record: dict[str, Any]) -> None:
        ctx.log(f"[finetune] step {record['step']} epoch {record['epoch']:.2f}: dev QWK {record['qwk']:.3f}, "
                f"accuracy {record['accuracy']:.3f} ({record['elapsed_s']:.0f}s)")

    result, model_id = run_finetune(ctx.store, data, model, out, args, progress=progress, resume=resume,
                                    started_at=started_at, retriever=retriever)
    return {**_adapter_outputs(model_id, out.resolve(), result.meta), "reused": False,
            "items": int(result.meta["pairs_seen"]), "unit": "pairs seen"}


def _heldout_baseline(ctx: StepContext, data: Any, held_out: Any) -> dict[str, Any] | None:
    """Held-out pairs for the relabel step's labeler to score, and the text baseline's agreement there,
    fitted on the train and dev labels the adapter learnt from."""
    import pandas as pd

    from annotator.evaluation import labelled_pairs
    from annotator.finetune import subsample
    from app.labeler_training import agreement, baseline_probs

    scheme = data.policy.scheme
    frame = labelled_pairs(ctx.store, scheme.name, data.sources)
    heldout = subsample(frame[held_out(frame)].reset_index(drop=True), int(ctx.options.get("heldout_pairs", 200)),
                        int(ctx.config.get("seed", 0)))
    if heldout.empty:
        return None
    probs = baseline_probs(pd.concat([data.train, data.dev]), heldout, scheme)
    return {"pair_ids": heldout["pair_id"].tolist(), "sources": data.sources, "n": int(len(heldout)),
            "queries": int(heldout["query_id"].nunique()), "baseline": agreement(probs, heldout, scheme)}


def step_relabel(ctx: StepContext) -> dict[str, Any]:
    """Label the mined pairs with the policy-prompted LLM (LoRA adapter when configured); resumable."""
    from annotator.batch import DEFAULT_REVIEW_THRESHOLD, LabelJob, job_labeler, run_label_job
    from trainer.registry import record_metrics

    options = ctx.options
    model = str(options.get("model", "smollm2"))
    _pull(ctx, model)
    finetuned = _finetune_outputs(ctx)
    adapter = options.get("adapter") or finetuned.get("adapter")
    mining_run = ctx.output("mine")["mining_run_id"]
    job = LabelJob(model=model, policy=str(options.get("policy", ctx.config.scheme)), select="mined",
                   backend=str(options.get("backend", "vllm")),
                   adapter=str(ctx.config.resolve(str(adapter))) if adapter else None,
                   limit=int(options["max_pairs"]) if options.get("max_pairs") else None, dataset=ctx.config.dataset,
                   mining_run=mining_run, chunk_size=int(options.get("chunk_size", 64)),
                   review_threshold=float(options.get("review_threshold", ctx.section("annotator").get(
                       "review_threshold", DEFAULT_REVIEW_THRESHOLD))),
                   backend_options=dict(options.get("backend_options", {})))
    # one engine labels the mined pairs and scores the finetune step's held-out pairs
    from app.retriever_cosine import adapter_retriever

    with job_labeler(job, retriever=adapter_retriever(ctx.store, job.adapter, use_stack=job.use_stack)) as labeler:
        result = run_label_job(ctx.store, job, labeler=labeler, progress=False)
        heldout = _heldout_agreement(ctx, labeler, finetuned.get("heldout"))
    if heldout is not None and finetuned.get("model_id") and adapter == finetuned["adapter"]:
        record_metrics(ctx.store, finetuned["model_id"], {"heldout": heldout})
    return {"label_run_id": result.run_id, "resumed": result.resumed, "selected": result.n_selected,
            "labelled_now": result.n_labelled_now, "label_counts": result.label_counts,
            "mean_confidence": result.mean_confidence, "needs_review": result.needs_review,
            "llm_pairs_per_s": round(result.pairs_per_s, 2), "author": result.author, "heldout": heldout,
            "items": result.n_selected, "unit": "pairs"}


def _finetune_outputs(ctx: StepContext) -> dict[str, Any]:
    """This loop's finetune outputs; {} when it never ran (a store from before the step)."""
    from app.loop.runner import latest_step_outputs

    return latest_step_outputs(ctx.store, "finetune", ctx.loop_run_id) or {}


def _heldout_agreement(ctx: StepContext, labeler: Any, heldout: dict[str, Any] | None) -> dict[str, Any] | None:
    """The labeler's agreement on the finetune step's held-out pairs, beside the text baseline's there."""
    import pandas as pd

    from annotator.batch import pair_texts, with_judged_examples
    from annotator.evaluation import labelled_pairs
    from app.labeler_training import agreement, label_counts

    if not heldout:
        return None
    scheme = labeler.policy.scheme
    frame = labelled_pairs(ctx.store, scheme.name, heldout["sources"]).set_index("pair_id")
    frame = frame.loc[pd.Index(heldout["pair_ids"])].reset_index()
    probs = labeler.score(with_judged_examples(ctx.store, labeler, pair_texts(frame), hide=heldout["pair_ids"]))
    chosen = labeler.choose_labels(probs)
    return {"n": heldout["n"], "queries": heldout["queries"], "labeler": agreement(probs, frame, scheme, chosen),
            "baseline": heldout["baseline"], "labeler_counts": label_counts(chosen, scheme)}


def step_engagement(ctx: StepContext) -> dict[str, Any]:
    """Add engagement events: simulated from the imported labels, read from a file, or those already stored."""
    options = dict(ctx.options)
    source = str(options.pop("source", "simulate"))
    where = f"{ctx.config.where} [loop.engagement]"
    if source == "simulate":
        from auditor.simulate import SimulationParams, simulate_into_store

        truth = ctx.store.df(sql("app.loop", "import_truth"), {"scheme": ctx.config.scheme, "dataset": ctx.config.dataset})
        if truth.empty:
            raise MnrError(f"{ctx.store.path}: no imported labels of scheme '{ctx.config.scheme}' in dataset "
                           f"'{ctx.config.dataset}' to simulate engagement from")
        params = SimulationParams(**_dataclass_values(SimulationParams, options))
        from labelstore.schemes import load_scheme

        added = simulate_into_store(ctx.store, truth, params, load_scheme(ctx.config.scheme).max_grade)
    elif source == "file":
        from auditor.ingest import ingest_events

        if "path" not in options:
            raise MnrError(f"{where}: source = 'file' needs a `path` (CSV, Parquet, JSONL or UBI events)")
        path = ctx.config.resolve(str(options["path"]))
        if not path.exists():
            raise MnrError(f"{where}: engagement file {path} does not exist")
        ubi_queries = ctx.config.resolve(str(options["ubi_queries"])) if options.get("ubi_queries") else None
        result = ingest_events(ctx.store, path, fmt=options.get("format"), dataset=ctx.config.dataset,
                               mapping=options.get("mapping"), ubi_queries=ubi_queries)
        added = result.inserted
    elif source == "parquet":
        if "path" not in options:
            raise MnrError(f"{where}: source = 'parquet' needs a `path` (a Parquet file, folder, glob or s3:// URL)")
        events_path = _location(ctx.config, str(options["path"]))
        total, simulated = _parquet_event_counts(events_path)
        return {"source": source, "events_path": events_path, "events_added": 0, "events_total": total,
                "simulated": simulated, "items": total, "unit": "events (read in place)"}
    elif source == "store":
        added = 0
    else:
        raise MnrError(f"{where}: source must be 'simulate', 'file', 'parquet' or 'store', not '{source}'")
    total, simulated = ctx.store.fetchall(sql("app.loop", "stored_event_counts"), {"dataset": ctx.config.dataset})[0]
    if total == 0:
        raise MnrError(f"{ctx.store.path}: no engagement events for dataset '{ctx.config.dataset}'; the audit needs some")
    return {"source": source, "events_path": None, "events_added": added, "events_total": total,
            "simulated": simulated, "items": added, "unit": "events"}


def _location(config: LoopConfig, value: str) -> str:
    """A local path resolved against the config's folder; URLs (s3://, gs://, https://) as given."""
    return value if "://" in value else str(config.resolve(value))


def _parquet_event_counts(events_path: str) -> tuple[int, bool]:
    """(events, any simulated) of Parquet events read in place, through the auditor's own reader."""
    import duckdb

    from auditor.metrics import attach_events

    with duckdb.connect() as con:
        attach_events(con, events_path)
        total, simulated = con.execute(sql("app.loop", "attached_event_counts")).fetchone()
    if total == 0:
        raise MnrError(f"{events_path}: no engagement events in it; the audit needs some")
    return int(total), bool(simulated)


def step_audit(ctx: StepContext) -> dict[str, Any]:
    """Audit the current labels against engagement and the retriever, write the HTML + JSON report."""
    from auditor.audit import run_audit
    from auditor.report import write_report
    from auditor.settings import AuditSettings

    settings = AuditSettings.from_config(ctx.section("auditor"))
    result = run_audit(ctx.store, ctx.config.scheme, settings, ctx.output("engagement").get("events_path"))
    report = write_report(ctx.store, result, ctx.workspace / "reports" / result.run_id, settings)
    summary = result.summary
    return {"audit_run_id": result.run_id, "report": str(report.resolve()), "flags": summary["flags"],
            "flagged_pairs": summary["flagged_pairs"], "flags_by_kind": summary["flags_by_kind"],
            "queued": summary["queued"], "drift_alarms": summary["drift_alarm_total"],
            "simulated": summary["simulated"], "items": summary["pairs_with_events"], "unit": "pairs"}


def step_trigger(ctx: StepContext) -> dict[str, Any]:
    """Decide whether to refine (the [trigger] policy); `[loop.trigger] force = true` always refines."""
    from app.trigger import run_trigger
    from auditor.trigger import TriggerPolicy

    policy = TriggerPolicy.from_config(ctx.section("trigger"))
    outcome = run_trigger(ctx.store, ctx.config.scheme, policy, launch=False)
    force = bool(ctx.options.get("force", False))
    reasons = list(outcome.decision.reasons) + (["forced by [loop.trigger] force = true"] if force else [])
    return {"trigger_run_id": outcome.run_id, "fired": outcome.decision.fire, "refine": outcome.decision.fire or force,
            "reasons": reasons, "counts": dataclasses.asdict(outcome.counts)}


def step_train_stage2(ctx: StepContext) -> dict[str, Any]:
    """Stage 2: multi-class circle loss from the Stage 1 model, on the current (relabelled) labels."""
    decision = ctx.output("trigger")
    if not decision.get("refine", True):
        return {"skipped": True, "reason": "the trigger held: " + "; ".join(decision.get("reasons", []))}
    stage1 = ctx.output("train-stage1")
    return _train(ctx, "stage2", stage1["path"], stage1["model_id"])


def step_evaluate(ctx: StepContext) -> dict[str, Any]:
    """Graded retrieval metrics on the held-out queries for zero-shot, Stage 1, Stage 2 and the promoted model."""
    from trainer.data import load_labelled_pairs, load_products
    from trainer.evaluation import evaluate_systems
    from trainer.model import TwoTowerModel
    from trainer.registry import ensure_zero_shot, model_row, promoted_model, record_metrics

    candidates = {"zero-shot": ensure_zero_shot(ctx.store), "stage1": ctx.output("train-stage1")["model_id"]}
    stage2 = ctx.output("train-stage2")
    if stage2.get("model_id"):
        candidates["stage2"] = stage2["model_id"]
    promoted = promoted_model(ctx.store)
    if promoted and promoted not in candidates.values():
        candidates["promoted"] = promoted
    split = _shared_split(ctx)
    pairs = load_labelled_pairs(ctx.store, ctx.config.scheme, ctx.config.dataset)
    _, held_out = pairs.split(split["holdout_fraction"], split["seed"])
    if str(ctx.options.get("labels", "import")) == "import":
        held_out = _with_import_grades(ctx, held_out)
    if held_out.frame.empty:
        raise MnrError(f"no held-out queries (holdout_fraction {split['holdout_fraction']}); raise [loop] holdout_fraction")
    products = load_products(ctx.store, ctx.config.dataset)
    systems = {name: TwoTowerModel.from_pretrained(model_row(ctx.store, model_id)["path"])
               for name, model_id in candidates.items()}
    if ctx.options.get("bm25", True):
        systems["bm25"] = None
    reports = {report.system: report for report in evaluate_systems(held_out, products, systems,
                                                                       k=int(ctx.options.get("k", 100)))}
    for name, model_id in candidates.items():
        record_metrics(ctx.store, model_id, {f"heldout_{k}": v for k, v in reports[name].metrics.items()})
    metrics = {name: {k: round(v, 4) for k, v in report.metrics.items()} for name, report in reports.items()}
    return {"models": candidates, "metrics": metrics,
            "ndcg@10": {name: metrics[name]["ndcg@10"] for name in metrics},
            "held_out_queries": int(held_out.frame["query_id"].nunique()),
            "items": int(held_out.frame["query_id"].nunique()) * len(systems), "unit": "query rankings"}


def _with_import_grades(ctx: StepContext, held_out: Any) -> Any:
    """The held-out pairs graded by their imported labels only: LLM relabels never change the test set."""
    from trainer.data import LabelledPairs

    truth = ctx.store.df(sql("app.loop", "import_truth"), {"scheme": ctx.config.scheme, "dataset": ctx.config.dataset})
    frame = held_out.frame.drop(columns=["label", "grade"]).merge(truth[["pair_id", "label", "grade"]], on="pair_id")
    frame["grade"] = frame["grade"].astype(int)
    return LabelledPairs(held_out.scheme, frame)


def step_promote(ctx: StepContext) -> dict[str, Any]:
    """Promote the newest trained model if it beats the promoted one (else zero-shot) on held-out NDCG@10."""
    from trainer.registry import DEFAULT_METRIC, compare_models, ensure_zero_shot, promote, promoted_model

    evaluated = ctx.output("evaluate")["models"]
    candidate = evaluated.get("stage2") or evaluated["stage1"]
    baseline = promoted_model(ctx.store) or ensure_zero_shot(ctx.store)
    metric = str(ctx.options.get("metric", DEFAULT_METRIC))
    min_gain = float(ctx.options.get("min_gain", 0.0))
    if candidate == baseline:
        return {"candidate": candidate, "baseline": baseline, "promoted": False, "reason": "already promoted"}
    better = compare_models(ctx.store, candidate, baseline, metric, min_gain)
    if better:
        promote(ctx.store, candidate)
    return {"candidate": candidate, "baseline": baseline, "metric": metric, "min_gain": min_gain, "promoted": better,
            "promoted_model": candidate if better else baseline,
            "reason": f"{candidate} {'beats' if better else 'does not beat'} {baseline} on {metric} by more than {min_gain}"}


# -- the keys each step's table accepts ------------------------------------------------------------
def _fields(cls: type, drop: tuple[str, ...] = ()) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - set(drop)


def _ingest_keys() -> set[str]:
    return {"source", "n_families", "seed", "path", "preset", "encoding", "sample_queries"}


def _train_keys() -> set[str]:
    from trainer.train import TrainConfig

    return _fields(TrainConfig, ("stage", "scheme", "dataset", "holdout_fraction", "seed"))


def _mine_keys() -> set[str]:
    from trainer.mining import MiningConfig

    return _fields(MiningConfig)


def _finetune_keys() -> set[str]:
    from annotator.finetune import FinetuneArgs

    return {"enabled", "sources", "model", "policy", "heldout_pairs", "retriever"} | _fields(FinetuneArgs)


def _relabel_keys() -> set[str]:
    return {"backend", "model", "policy", "adapter", "max_pairs", "chunk_size", "review_threshold", "backend_options"}


def _engagement_keys() -> set[str]:
    from auditor.simulate import SimulationParams

    return {"source", "path", "format", "ubi_queries", "mapping"} | _fields(SimulationParams)


STEPS: tuple[Step, ...] = (
    Step("ingest", step_ingest, _ingest_keys),
    Step("train-stage1", step_train_stage1, _train_keys),
    Step("mine", step_mine, _mine_keys),
    Step("finetune", step_finetune, _finetune_keys),
    Step("relabel", step_relabel, _relabel_keys, sections=("annotator",)),
    Step("engagement", step_engagement, _engagement_keys),
    Step("audit", step_audit, sections=("auditor",)),
    Step("trigger", step_trigger, lambda: {"force"}, sections=("trigger",)),
    Step("train-stage2", step_train_stage2, _train_keys),
    Step("evaluate", step_evaluate, lambda: {"k", "bm25", "labels"}),
    Step("promote", step_promote, lambda: {"metric", "min_gain"}),
)
STEP_NAMES: tuple[str, ...] = tuple(step.name for step in STEPS)
