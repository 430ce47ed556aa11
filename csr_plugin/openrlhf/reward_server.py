"""HTTP reward server speaking OpenRLHF's remote reward-model protocol.

Pass ``--reward.remote_url http://HOST:PORT/get_reward`` to ``openrlhf.cli.train_ppo_ray``.
One server holds one copy of the scoring VLM and CLIP for every vLLM engine,
where a ``reward_func`` file loads a copy into each engine's process.

Protocol, as ``SingleTurnAgentExecutor._fetch_rewards_via_http``
(openrlhf/utils/agent.py) posts it and ``openrlhf/cli/serve_rm.py`` answers it:
``POST /get_reward {"query": [...], "prompts": [...], "labels": [...]}`` ->
``{"rewards": [...], "scores": [...], "extra_logs": {"r_i": [...], "r_t": [...]}}``.
The executor sends one response per request and many requests at once, so a
single scoring thread batches responses across requests: the model sees large
batches and is never used from two threads.

Run: ``csr serve-reward --config recipe.yaml --port 5000``.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

from csr_plugin.config import Recipe
from csr_plugin.openrlhf.response_reward import ResponseItem, ResponseRewardScorer, ScoredResponse, openrlhf_items

log = logging.getLogger(__name__)

_MAX_BODY = 64 << 20  # a request of thousands of long responses stays far below this
_STOP = object()


# Each failure carries the HTTP status it is answered with.
class QueueFullError(RuntimeError):
    status = 503


class ScoringTimeoutError(TimeoutError):
    status = 504


class ScoringError(RuntimeError):
    status = 500


@dataclass
class _Job:
    items: list[ResponseItem]
    done: threading.Event = field(default_factory=threading.Event)
    results: Optional[list[ScoredResponse]] = None
    error: Optional[str] = None
    abandoned: bool = False  # its caller timed out: do not spend the model on it


class BatchingScorer:
    """Feeds one scorer from many threads: a bounded queue and one worker thread that scores
    up to ``max_batch`` responses per call, gathered across requests."""

    def __init__(self, scorer, max_batch: int = 64, max_queue: int = 1024):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}.")
        self.scorer = scorer
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._run, name="csr-reward-scorer", daemon=True)
        self._worker.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def score(self, items: Sequence[ResponseItem], timeout_s: Optional[float] = None) -> list[ScoredResponse]:
        if not items:
            return []
        job = _Job(list(items))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"reward queue full ({self._queue.maxsize} requests waiting); retry later or "
                                 "start the server with a larger max_queue.") from None
        if not job.done.wait(timeout_s):
            job.abandoned = True
            raise ScoringTimeoutError(f"not scored within {timeout_s} s; the scorer is overloaded: add reward "
                                      "servers or raise timeout_s.")
        if job.error is not None:
            raise ScoringError(job.error)
        return job.results

    def close(self) -> None:
        """Stop the worker once the queued requests are scored; a stuck scorer cannot block exit (daemon)."""
        try:
            self._queue.put(_STOP, timeout=60)
        except queue.Full:
            return
        self._worker.join(timeout=60)

    def _run(self) -> None:
        carry = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is _STOP:
                return
            batch, size = [job], len(job.items)
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or size + len(nxt.items) > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                size += len(nxt.items)
            self._score([j for j in batch if not j.abandoned])

    def _score(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        items = [item for job in jobs for item in job.items]
        started = time.perf_counter()
        try:
            # A single request may exceed max_batch; it is scored in max_batch slices.
            results = [scored for k in range(0, len(items), self.max_batch)
                       for scored in self.scorer.score(items[k:k + self.max_batch])]
        except Exception as exc:  # fail this batch's requests, keep serving
            log.warning("reward batch of %d responses failed: %s: %s", len(items), type(exc).__name__, exc)
            for job in jobs:
                job.error = f"scoring failed: {type(exc).__name__}: {exc}"
                job.done.set()
            return
        log.debug("scored %d responses from %d requests in %.3f s, %d queued", len(items), len(jobs),
                  time.perf_counter() - started, self.queued)
        offset = 0
        for job in jobs:
            job.results = results[offset:offset + len(job.items)]
            offset += len(job.items)
            job.done.set()


class _RequestError(ValueError):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
    timeout = 120  # drop idle keep-alive connections instead of holding a thread for each
    server: "_HTTPServer"

    def log_message(self, format, *args) -> None:  # noqa: A002 - base-class signature
        pass  # one debug line per batch instead (BatchingScorer)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/health":
            self._send(200, {"status": "ok", "queued": self.server.batcher.queued})
        else:
            self._send(404, {"error": f"unknown path {self.path!r}; use POST /get_reward or GET /health."})

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/get_reward":
            self.close_connection = True  # the body is left unread
            self._send(404, {"error": f"unknown path {self.path!r}; use POST /get_reward or GET /health."})
            return
        try:
            items = self._read_items()
            for item in items:  # a bad image fails its own request, not a whole batch
                self.server.batcher.scorer.image(item.image)
            scored = self.server.batcher.score(items, self.server.timeout_s)
        except (ValueError, QueueFullError, ScoringTimeoutError, ScoringError) as exc:
            self._send(getattr(exc, "status", 400), {"error": str(exc)})  # a plain ValueError: bad input
            return
        rewards = [s.reward for s in scored]
        self._send(200, {"rewards": rewards, "scores": rewards,
                         "extra_logs": {"r_i": [s.r_i for s in scored], "r_t": [s.r_t for s in scored]}})

    def _read_items(self) -> list[ResponseItem]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self.close_connection = True
            raise _RequestError(411 if length < 0 else 413,
                                f"send a JSON body of at most {_MAX_BODY} bytes with a Content-Length header.")
        try:
            data = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _RequestError(400, f"body is not valid JSON ({exc}).") from None
        if not isinstance(data, dict):
            raise _RequestError(400, 'body must be a JSON object {"query": [...], "prompts": [...], "labels": [...]}.')
        missing = [key for key in ("query", "prompts", "labels") if key not in data]
        if missing:
            raise _RequestError(400, f"missing field(s) {', '.join(missing)}; send query, prompts and labels lists.")
        return openrlhf_items(data["query"], data["prompts"], data["labels"], self.server.batcher.scorer.image_token)

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many rollout workers connect at once; the default backlog of 5 would drop their SYNs.
    request_queue_size = 512

    def __init__(self, address: tuple[str, int], batcher: BatchingScorer, timeout_s: float):
        self.batcher = batcher
        self.timeout_s = timeout_s
        super().__init__(address, _Handler)


class RewardServer:
    """The HTTP server around a scorer; binds at construction, so ``port`` is known before serving."""

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = 0, max_batch: int = 64,
                 max_queue: int = 1024, timeout_s: float = 30.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}.")
        self._batcher = BatchingScorer(scorer, max_batch, max_queue)
        self._httpd = _HTTPServer((host, port), self._batcher, timeout_s)
        self._thread: Optional[threading.Thread] = None
        self._serving = False
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def run(self) -> None:
        """Serve in this thread until ``stop`` (from another thread) or Ctrl-C."""
        self._serving = True
        self._httpd.serve_forever(poll_interval=0.2)

    def start(self) -> "RewardServer":
        """Serve in a background thread."""
        self._serving = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="csr-reward-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._serving:  # shutdown() waits for serve_forever, which would never come otherwise
            self._httpd.shutdown()
        self._httpd.server_close()
        self._batcher.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(recipe: Recipe, host: str = "127.0.0.1", port: int = 0, max_batch: int = 64, max_queue: int = 1024,
          timeout_s: float = 30.0, ready: Optional[Callable[[RewardServer], None]] = None) -> None:
    """Load the scorer and serve until stopped; ``ready(server)`` runs once the port is bound."""
    server = RewardServer(ResponseRewardScorer.from_recipe(recipe), host, port, max_batch, max_queue, timeout_s)
    log.info("CSR reward server on http://%s:%d/get_reward", server.host, server.port)
    try:
        if ready is not None:
            ready(server)
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()

