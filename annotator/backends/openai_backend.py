"""The `openai` backend: any OpenAI-compatible `/v1/completions` endpoint, e.g. `mnr serve`.

Each request carries a sub-batch of prompts with `max_tokens=1`, `logprobs=n_labels`,
`allowed_token_ids`, structured `choice` and `return_tokens_as_token_ids` (vLLM extensions,
sent as extra body fields). The server must run with `--logprobs-mode processed_logprobs` (as
`mnr serve` does), so that the top logprobs it returns are the label tokens after masking.

Several endpoints can share the work: requests go out with bounded concurrency (at most
`max_concurrency` in flight per endpoint), to endpoints picked round-robin or least-busy. A
failed request is retried with exponential backoff on the next endpoint; when `retries`
attempts have failed, `EndpointError` stops the job (finished chunks stay written).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np

from annotator.backends.base import STOP
from labelstore.errors import MnrError

STRATEGIES = ("round-robin", "least-busy")


class EndpointError(MnrError):
    """No endpoint answered after all retries, or an endpoint answered something unusable."""


class EndpointPool:
    """Hands out endpoints with at most `max_concurrency` requests in flight on each."""

    def __init__(self, endpoints: list[str], max_concurrency: int = 4, strategy: str = "round-robin"):
        if not endpoints:
            raise EndpointError("no endpoint given: pass --endpoint URL (repeatable)")
        if strategy not in STRATEGIES:
            raise EndpointError(f"unknown endpoint strategy '{strategy}' (use one of: {', '.join(STRATEGIES)})")
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.max_concurrency = max_concurrency
        self.strategy = strategy
        self.in_flight = {url: 0 for url in self.endpoints}
        self.served = {url: 0 for url in self.endpoints}
        self._order = itertools.cycle(self.endpoints)
        self._ready = threading.Condition()

    def _pick(self, avoid: str | None) -> str | None:
        free = [url for url in self.endpoints if self.in_flight[url] < self.max_concurrency]
        if len(free) > 1 and avoid in free:
            free.remove(avoid)
        if not free:
            return None
        if self.strategy == "least-busy":
            return min(free, key=lambda url: (self.in_flight[url], self.served[url]))
        for _ in range(len(self.endpoints)):
            url = next(self._order)
            if url in free:
                return url
        return None

    @contextmanager
    def lease(self, avoid: str | None = None) -> Iterator[str]:
        """An endpoint to send one request to; `avoid` is skipped when another one is free."""
        with self._ready:
            url = self._pick(avoid)
            while url is None:
                self._ready.wait()
                url = self._pick(avoid)
            self.in_flight[url] += 1
        try:
            yield url
        finally:
            with self._ready:
                self.in_flight[url] -= 1
                self.served[url] += 1
                self._ready.notify_all()


class OpenAIBackend:
    """Parameters: `model` the served model name; `adapter` the served LoRA module name (its
    folder name, as `mnr serve --adapter` registers it); `endpoints` base URLs ending in /v1."""

    def __init__(self, model: str, adapter: str | None = None, *, endpoints: list[str] | str | None = None,
                 api_key: str = "EMPTY", max_concurrency: int = 4, strategy: str = "round-robin",
                 batch_size: int = 8, retries: int = 5, backoff: float = 0.5, timeout: float = 120.0,
                 structured: bool = True, **_ignored: Any):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.pool = EndpointPool(list(endpoints or ["http://127.0.0.1:8000/v1"]), max_concurrency, strategy)
        self.served_model = _served_name(model, adapter)
        self.batch_size = batch_size
        self.retries = retries
        self.backoff = backoff
        self.structured = structured
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {api_key}"},
                                   limits=httpx.Limits(max_connections=max_concurrency * len(self.pool.endpoints) + 2))

    # -- requests with retry --------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any], root: bool = False) -> dict[str, Any]:
        last_error: Exception | None = None
        failed: str | None = None
        for attempt in range(self.retries):
            with self.pool.lease(avoid=failed) as url:
                target = (url.removesuffix("/v1") if root else url) + path
                try:
                    response = self.client.post(target, json=body)
                except httpx.TransportError as exc:
                    last_error, failed = exc, url
                else:
                    if response.status_code < 500 and response.status_code != 429:
                        if response.status_code >= 400:
                            raise EndpointError(f"{target} refused the request ({response.status_code}): "
                                                f"{response.text[:500]}")
                        return response.json()
                    last_error, failed = EndpointError(f"{response.status_code} {response.text[:200]}"), url
            time.sleep(self.backoff * (2 ** attempt))
        raise EndpointError(
            f"no answer from {', '.join(self.pool.endpoints)} after {self.retries} attempts "
            f"({type(last_error).__name__}: {last_error}); is the server running? (`mnr serve`)"
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        reply = self._post("/tokenize", {"model": self.served_model, "prompt": text,
                                         "add_special_tokens": add_special_tokens}, root=True)
        return [int(t) for t in reply["tokens"]]

    def _score_batch(self, prompts: list[str], token_ids: list[int], options: list[str]) -> np.ndarray:
        body: dict[str, Any] = {
            "model": self.served_model, "prompt": prompts, "max_tokens": 1, "temperature": 1.0,
            "logprobs": len(token_ids), "allowed_token_ids": token_ids, "return_tokens_as_token_ids": True,
        }
        if self.structured:
            body["structured_outputs"] = {"choice": options}
        reply = self._post("/completions", body)
        result = np.full((len(prompts), len(token_ids)), -np.inf)
        for choice in reply["choices"]:
            top = choice["logprobs"]["top_logprobs"][0]
            by_id = {int(key.split(":", 1)[1]): value for key, value in top.items()}
            for col, token in enumerate(token_ids):
                if token in by_id:
                    result[choice["index"], col] = by_id[token]
        if not np.isfinite(result).all():
            raise EndpointError("the server's logprobs miss some label tokens: start it with "
                                "--logprobs-mode processed_logprobs (`mnr serve` does)")
        return result

    def _map_batches(self, prompts: list[str], request: Callable[[list[str]], Any]) -> list[Any]:
        """`request` on each sub-batch of `prompts`, spread over the endpoints; results in order."""
        batches = [prompts[i:i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        if not batches:
            return []
        workers = self.pool.max_concurrency * len(self.pool.endpoints)
        with ThreadPoolExecutor(max_workers=min(workers, len(batches))) as executor:
            return list(executor.map(request, batches))

    def label_logprobs(self, prompts: list[str], token_ids: list[int], options: list[str]) -> np.ndarray:
        parts = self._map_batches(prompts, lambda batch: self._score_batch(batch, token_ids, options))
        return np.concatenate(parts) if parts else np.zeros((0, len(token_ids)))

    def _generate_batch(self, prompts: list[str], max_tokens: int, temperature: float, seed: int) -> list[str]:
        reply = self._post("/completions", {"model": self.served_model, "prompt": prompts, "max_tokens": max_tokens,
                                            "temperature": temperature, "seed": seed, "stop": [STOP]})
        texts = [""] * len(prompts)
        for choice in reply["choices"]:
            texts[choice["index"]] = choice["text"]
        return texts

    def generate(self, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        parts = self._map_batches(prompts, lambda batch: self._generate_batch(batch, max_tokens, temperature, seed))
        return [text for part in parts for text in part]

    def close(self) -> None:
        self.client.close()


def _served_name(model: str, adapter: str | None) -> str:
    if adapter is None:
        return model
    from pathlib import Path

    return Path(adapter).name or adapter
