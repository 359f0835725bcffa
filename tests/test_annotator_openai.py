"""The openai backend against two real local vLLM servers (tiny Llama, 127.0.0.1).

Covers: agreement with transformers, several endpoints (round-robin and least-busy) with bounded
concurrency, and an endpoint that goes down mid-job (retry with backoff, then a clean stop that
keeps the finished chunks; the next start resumes the run).
"""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from annotator.backends.openai_backend import EndpointError, EndpointPool
from annotator.batch import LabelJob, run_label_job
from annotator.labeler import Labeler
from annotator.prompts import PairText
from annotator.serve import start_server, stop_server, wait_until_ready
from labelstore import Store
from labelstore.catalog import generate_catalog, write_catalog

pytestmark = pytest.mark.vllm

AGREEMENT_ATOL = 1e-3
PROB_FLOOR = 0.005  # every compared probability in [0.005, 0.995]: the tiny random model is not saturated
FLAG_PROB_FLOOR = 0.01  # every compared flag probability in [0.01, 0.99]
PAIRS = [PairText(f"cordless drill {volts}v", f"{brand} {volts}v cordless drill", None, brand)
         for volts in (12, 18, 20) for brand in ("Bosch", "Philips", "Makita", "Ryobi")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def endpoints(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two vLLM OpenAI-compatible servers serving the tiny Llama as 'tiny'."""
    logs = tmp_path_factory.mktemp("servers")
    servers = []
    for index in range(2):
        port = _free_port()
        process = start_server(str(tiny_llama), port=port, dtype="float32", max_model_len=1024,
                               log_path=logs / f"server{index}.log")
        servers.append((f"http://127.0.0.1:{port}/v1", process))
    try:
        for index, (url, process) in enumerate(servers):
            try:
                wait_until_ready(url, process, timeout=400)
            except Exception:
                print((logs / f"server{index}.log").read_text()[-3000:])
                raise
        yield [url for url, _ in servers]
    finally:
        for _, process in servers:
            stop_server(process)


def _labeler(tiny_llama: Path, endpoints: list[str], **options) -> Labeler:
    return Labeler(str(tiny_llama), "esci", backend="openai", endpoints=endpoints, **options)


def test_openai_backend_agrees_with_transformers(tiny_llama: Path, endpoints: list[str]) -> None:
    remote = _labeler(tiny_llama, endpoints[:1], batch_size=5)
    local = Labeler(str(tiny_llama), "esci", backend="transformers")
    assert remote.token_ids == local.token_ids, "the server's /tokenize gives the same label tokens"
    remote_probs, local_probs = remote.score(PAIRS), local.score(PAIRS)
    assert (remote_probs.argmax(axis=1) == local_probs.argmax(axis=1)).all()
    # clear of 0 and 1, so an absolute tolerance of 1e-3 compares something
    assert local_probs.min() > PROB_FLOOR and local_probs.max() < 1 - PROB_FLOOR, (local_probs.min(), local_probs.max())
    np.testing.assert_allclose(remote_probs, local_probs, atol=AGREEMENT_ATOL)
    assert remote.author == local.author
    prompts = [f"Product: {pair.title}\nQuery:" for pair in PAIRS[:6]]
    assert ([text.rstrip("\ufffd") for text in remote.backend.generate(prompts, max_tokens=6)]
            == [text.rstrip("\ufffd") for text in local.backend.generate(prompts, max_tokens=6)])


def test_openai_backend_scores_flags_as_transformers_does(tiny_llama: Path, endpoints: list[str]) -> None:
    remote = Labeler(str(tiny_llama), "marketplace", backend="openai", endpoints=endpoints[:1], batch_size=5)
    local = Labeler(str(tiny_llama), "marketplace", backend="transformers")
    assert remote.flag_token_ids == local.flag_token_ids, "the server's /tokenize gives the same yes/no tokens"
    (remote_probs, remote_flags), (local_probs, local_flags) = remote.score_with_flags(PAIRS), local.score_with_flags(PAIRS)
    assert (remote_probs.argmax(axis=1) == local_probs.argmax(axis=1)).all()
    assert remote_flags.shape == (len(PAIRS), 2)
    # not saturated (the tiny model puts 'prohibited' near 0.987 on some drills), so 1e-3 compares something;
    # the yes/no log-probabilities themselves (down to about -4.3) agree too
    assert np.minimum(local_flags, 1 - local_flags).min() > FLAG_PROB_FLOOR, local_flags
    np.testing.assert_allclose(remote_flags, local_flags, atol=AGREEMENT_ATOL)
    grades = [local.label_names[i] for i in local_probs.argmax(axis=1)]
    np.testing.assert_allclose(remote.flag_logprobs(PAIRS, grades), local.flag_logprobs(PAIRS, grades),
                               atol=AGREEMENT_ATOL)


@pytest.mark.parametrize("strategy", ["round-robin", "least-busy"])
def test_several_endpoints_share_the_work(tiny_llama: Path, endpoints: list[str], strategy: str) -> None:
    single = _labeler(tiny_llama, endpoints[:1], batch_size=2).score(PAIRS)
    shared = _labeler(tiny_llama, endpoints, batch_size=2, max_concurrency=2, strategy=strategy)
    shared.backend.pool.served = {url: 0 for url in endpoints}
    np.testing.assert_allclose(shared.score(PAIRS), single, atol=1e-6)
    served = shared.backend.pool.served
    assert sum(served.values()) == len(PAIRS) // 2 and min(served.values()) >= 1, served


def test_pool_reaches_but_never_exceeds_max_concurrency() -> None:
    """8 workers on 2 endpoints x 2 slots: 4 leases are held at once (2 on each endpoint), never more.

    Each worker holds its lease until 4 are held together (or 2 s pass), so a pool that hands out
    fewer slots than it may (one request at a time) is seen, not just one that hands out too many."""
    pool = EndpointPool(["http://a/v1", "http://b/v1"], max_concurrency=2, strategy="least-busy")
    peak = {"endpoint": 0, "total": 0}
    lock = threading.Lock()
    start = threading.Barrier(8)
    all_slots_held = threading.Event()

    def work() -> None:
        start.wait()
        with pool.lease():
            with pool._ready:  # the pool's own lock: a consistent view of every endpoint's count
                counts = list(pool.in_flight.values())
            with lock:
                peak["endpoint"] = max(peak["endpoint"], max(counts))
                peak["total"] = max(peak["total"], sum(counts))
                if sum(counts) == 4:
                    all_slots_held.set()
            all_slots_held.wait(2.0)
            threading.Event().wait(0.01)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all_slots_held.is_set()
    assert peak == {"endpoint": 2, "total": 4}
    assert sum(pool.served.values()) == 8 and set(pool.in_flight.values()) == {0}


class _Proxy:
    """A real HTTP forwarder to one server that can be shut down: the endpoint 'goes down'."""

    def __init__(self, target: str):
        root = target.removesuffix("/v1")

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                reply = httpx.post(root + self.path, content=body, headers={"Content-Type": "application/json"},
                                   timeout=120)
                self.send_response(reply.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def go_down(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_endpoint_down_mid_job_keeps_finished_chunks_and_resumes(tiny_llama: Path, endpoints: list[str],
                                                                 tmp_path: Path) -> None:
    store = Store(tmp_path / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=4, seed=2))
    proxy = _Proxy(endpoints[0])
    job = LabelJob(model=str(tiny_llama), policy="home-improvement", backend="openai", limit=24, chunk_size=8,
                   backend_options={"endpoints": [proxy.url], "retries": 3, "backoff": 0.05})
    with pytest.raises(EndpointError, match="after 3 attempts"):
        run_label_job(store, job, progress=False, on_chunk=lambda run_id, done: proxy.go_down())
    run_id, status = store.fetchall("SELECT run_id, status FROM runs WHERE kind = 'label'")[0]
    assert status == "failed"
    assert store.scalar("SELECT count(*) FROM labels WHERE run_id = ?", [run_id]) == 8, "first chunk kept"
    job.backend_options = {"endpoints": endpoints}
    result = run_label_job(store, job, progress=False)
    assert result.run_id == run_id and result.resumed and result.n_labelled_now == 16
    counts = store.df("SELECT pair_id, count(*) AS n FROM labels WHERE run_id = ? GROUP BY pair_id", [run_id])
    assert len(counts) == 24 and (counts["n"] == 1).all()
