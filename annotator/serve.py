"""Start an OpenAI-compatible vLLM server for the `openai` backend (`mnr serve`).

On CPU the server is `python -m vllm.entrypoints.openai.api_server`. It runs with
`--logprobs-mode processed_logprobs` (label probabilities come from the masked logprobs),
prefix caching for the shared policy prefix, and an optional LoRA adapter served under its folder
name. Bound to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from annotator.backends.vllm_backend import PREFIX_BLOCK_SIZE, adapter_rank, preferred_dtype
from annotator.labeler import check_adapter
from annotator.models import resolve_model
from labelstore.errors import MnrError
from labelstore.runtime import apply_engine_env_defaults


class ServerError(MnrError):
    """The server exited or did not become ready in time."""


def server_command(model: str, *, host: str = "127.0.0.1", port: int = 8000, adapter: str | None = None,
                   max_model_len: int = 2048, dtype: str = "auto", extra_args: list[str] | None = None) -> list[str]:
    """The server's command line; the model is served under the name `model` as given."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", resolve_model(model), "--served-model-name", model,
        "--host", host, "--port", str(port), "--dtype", preferred_dtype(adapter) if dtype == "auto" else dtype,
        "--max-model-len", str(max_model_len), "--logprobs-mode", "processed_logprobs",
        "--enable-prefix-caching", "--block-size", str(PREFIX_BLOCK_SIZE), "--enforce-eager", "--disable-uvicorn-access-log",
    ]
    if adapter is not None:
        path = check_adapter(adapter).path
        command += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(adapter_rank(path)),
                    "--lora-modules", f"{path.name}={path}"]
    return command + list(extra_args or [])


def server_env() -> dict[str, str]:
    return dict(apply_engine_env_defaults(dict(os.environ)))


def start_server(model: str, *, log_path: Path | None = None, **options) -> subprocess.Popen:
    """Start the server in the background; stdout and stderr go to `log_path` (or are inherited)."""
    command = server_command(model, **options)
    log = open(log_path, "wb") if log_path is not None else None  # noqa: SIM115 - owned by the child
    return subprocess.Popen(command, env=server_env(), stdout=log, stderr=subprocess.STDOUT if log else None)


def wait_until_ready(base_url: str, process: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    """Poll `<root>/health` until it answers 200; raise `ServerError` if the process dies or time runs out."""
    health = base_url.rstrip("/").removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"the vLLM server exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(health, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise ServerError(f"the vLLM server at {base_url} was not ready after {timeout:.0f}s")


def stop_server(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Terminate a server started by `start_server` (SIGTERM, then SIGKILL)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
