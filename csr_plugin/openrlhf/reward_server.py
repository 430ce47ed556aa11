"""HTTP reward server speaking OpenRLHF's remote reward-model protocol, on FastAPI + uvicorn.

Pass ``--reward.remote_url http://HOST:PORT/get_reward`` to ``openrlhf.cli.train_ppo_ray``.
One server holds one copy of the scoring VLM and CLIP for every vLLM engine,
where a ``reward_func`` file loads a copy into each engine's process.

Protocol, as ``SingleTurnAgentExecutor._fetch_rewards_via_http``
(openrlhf/utils/agent.py) posts it and ``openrlhf/cli/serve_rm.py`` answers it:
``POST /get_reward {"query": [...], "prompts": [...], "labels": [...]}`` ->
``{"rewards": [...], "scores": [...], "extra_logs": {"r_i": [...], "r_t": [...]}}``.
The executor sends one response per request and many requests at once, so a
single scoring thread batches responses across requests: the model sees large
batches and is never used from two threads. Errors are ``{"error": reason}``:
400 malformed, 403 image outside ``--image-root``, 404 / 405 wrong path / method,
411 no body, 413 body over ``--max-request-bytes``, 500 its batch failed,
503 queue full, 504 not scored within ``--timeout``.

Run: ``csr serve-reward --config recipe.yaml --port 5000``.
"""
import asyncio
import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from csr_plugin.config import Recipe
from csr_plugin.openrlhf.response_reward import ResponseItem, ResponseRewardScorer, ScoredResponse, openrlhf_items

log = logging.getLogger(__name__)

# OpenRLHF 0.11.2's client (openrlhf/utils/agent.py, _fetch_rewards_via_http): line 331
# `aiohttp.ClientTimeout(total=180)`; lines 347-358 try each request 5 times, 1 s apart, after any
# error (a timeout, a 503, a 504). A server timeout under 180 s would answer 504 to a request the
# client still waits for, and the client would only queue it again: the server waits longer, so a
# client that gives up first disconnects, and a request whose client is gone is dropped unscored.
OPENRLHF_CLIENT_TIMEOUT_S = 180.0
DEFAULT_TIMEOUT_S = 200.0
# OpenRLHF sends one response per request with its prompt twice (query and prompts), the image
# placeholder expanded: at most ~0.4 MB (Qwen2.5-VL's largest image, 16,384 13-byte <|image_pad|>),
# ~9 KB for LLaVA-1.5. 16 MiB takes ~40 of the former or ~1,800 of the latter in one request.
DEFAULT_MAX_REQUEST_BYTES = 16 << 20
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
    on_done: Optional[Callable[[], None]] = None  # wakes an asyncio caller (the server's event loop)
    done: threading.Event = field(default_factory=threading.Event)
    results: Optional[list[ScoredResponse]] = None
    error: Optional[str] = None
    abandoned: bool = False  # its caller timed out or left: do not spend the model on it

    def finish(self, results: Optional[list[ScoredResponse]] = None, error: Optional[str] = None) -> None:
        self.results, self.error = results, error
        self.done.set()
        if self.on_done is not None:
            self.on_done()


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

    def submit(self, items: Sequence[ResponseItem], on_done: Optional[Callable[[], None]] = None) -> _Job:
        """Queue ``items``; ``on_done()`` runs on the worker thread once they are scored (or failed)."""
        job = _Job(list(items), on_done)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"reward queue full ({self._queue.maxsize} requests waiting); retry later or "
                                 "start the server with a larger --max-queue.") from None
        return job

    def score(self, items: Sequence[ResponseItem], timeout_s: Optional[float] = None) -> list[ScoredResponse]:
        if not items:
            return []
        job = self.submit(items)
        if not job.done.wait(timeout_s):
            job.abandoned = True
            raise ScoringTimeoutError(_timeout_reason(timeout_s))
        return self.result(job)

    @staticmethod
    def result(job: _Job) -> list[ScoredResponse]:
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
                job.finish(error=f"scoring failed: {type(exc).__name__}: {exc}")
            return
        log.debug("scored %d responses from %d requests in %.3f s, %d queued", len(items), len(jobs),
                  time.perf_counter() - started, self.queued)
        offset = 0
        for job in jobs:
            job.finish(results[offset:offset + len(job.items)])
            offset += len(job.items)


def _timeout_reason(timeout_s) -> str:
    return (f"not scored within {timeout_s} s; the scorer is overloaded: add reward servers or raise "
            "--timeout.")


# ------------------------------------------------------------------ the HTTP layer
class _RequestError(ValueError):
    def __init__(self, status: int, reason: str, close: bool = False):
        super().__init__(reason)
        self.status = status
        self.close = close  # part of the body is unread: end the connection rather than read the rest


class _ClientGone(Exception):
    """The client disconnected before its answer; nobody reads what is sent back."""


def _server_libs():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"csr serve-reward runs on FastAPI and uvicorn, and {exc.name} is not installed: "
                          "pip install 'csr-plugin[serve]' (or: pip install fastapi uvicorn).") from exc
    return uvicorn


def _answer(status: int, payload: dict, headers: Optional[dict] = None):
    from fastapi import Response

    # json.dumps, not JSONResponse: a reward of -inf (a token of probability 0) stays -Infinity,
    # which OpenRLHF's aiohttp client parses, instead of failing the whole answer.
    return Response(json.dumps(payload), status, headers, media_type="application/json")


async def _read_body(request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``limit``: from Content-Length before a byte
    of it is read, or while a chunked body streams in."""
    declared = request.headers.get("content-length")
    if declared is None and "chunked" not in request.headers.get("transfer-encoding", "").lower():
        raise _RequestError(411, "send the JSON body with a Content-Length header (or chunked).")

    def too_large(size: str) -> _RequestError:
        return _RequestError(413, f"request body of {size} bytes is over the server's --max-request-bytes {limit}; "
                                  "send fewer responses per request or restart the server with a larger "
                                  "--max-request-bytes.", close=True)

    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(f"more than {len(body)}")
    return bytes(body)


def _parse(body: bytes, scorer, image_root: Optional[Path]) -> list[ResponseItem]:
    """Request body -> items, each image checked (under ``image_root``, readable); runs off the event loop."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _RequestError(400, f"body is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise _RequestError(400, 'body must be a JSON object {"query": [...], "prompts": [...], "labels": [...]}.')
    missing = [key for key in ("query", "prompts", "labels") if key not in data]
    if missing:
        raise _RequestError(400, f"missing field(s) {', '.join(missing)}; send query, prompts and labels lists.")
    items = openrlhf_items(data["query"], data["prompts"], data["labels"], scorer.image_token)
    for item in items:
        if image_root is not None:
            resolved = Path(item.image).resolve()  # symlinks and '..' followed: a link out of the root is out
            if not resolved.is_relative_to(image_root):
                raise _RequestError(403, f"label image {item.image!r} (resolved: {resolved}) is outside "
                                         f"--image-root {image_root}; send images under it or restart the "
                                         "server with another --image-root.")
        scorer.image(item.image)  # a bad image fails its own request, not a whole batch
    return items


async def _client_gone(request) -> None:
    """Returns once the client disconnects: after the body, uvicorn's receive() waits for exactly that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _score(batcher: BatchingScorer, items: list[ResponseItem], timeout_s: float, request):
    loop = asyncio.get_running_loop()
    scored = asyncio.Event()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(scored.set)
        except RuntimeError:  # the loop is closed: the server stopped while this batch was scored
            pass

    job = batcher.submit(items, wake)
    waits = [asyncio.ensure_future(scored.wait()), asyncio.ensure_future(_client_gone(request))]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    if job.done.is_set():
        return batcher.result(job)
    job.abandoned = True  # if still queued, the worker skips it
    if waits[1] in done:
        log.debug("client left before its %d responses were scored; dropped", len(items))
        raise _ClientGone
    raise ScoringTimeoutError(_timeout_reason(timeout_s))


def create_app(batcher: BatchingScorer, timeout_s: float, max_request_bytes: int, image_root: Optional[Path]):
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    # `request: Request` must be a real annotation for FastAPI (no `from __future__ import annotations` here).
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)  # two endpoints, nothing else answers

    @app.exception_handler(HTTPException)
    async def wrong_path_or_method(request: Request, exc: HTTPException):
        reason = {404: f"unknown path {request.url.path!r}",
                  405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _answer(exc.status_code, {"error": f"{reason}; use POST /get_reward or GET /health."}, exc.headers)

    @app.get("/health")
    async def health():
        return _answer(200, {"status": "ok", "queued": batcher.queued})

    @app.post("/get_reward")
    async def get_reward(request: Request):
        try:
            body = await _read_body(request, max_request_bytes)
            items = await run_in_threadpool(_parse, body, batcher.scorer, image_root)
            scored = await _score(batcher, items, timeout_s, request) if items else []
        except (ClientDisconnect, _ClientGone):
            return _answer(499, {"error": "client closed the request"})  # nginx's code; only the access log sees it
        except (ValueError, QueueFullError, ScoringTimeoutError, ScoringError) as exc:  # a plain ValueError: bad input
            status = getattr(exc, "status", 400)
            headers = {"Connection": "close"} if getattr(exc, "close", False) else \
                {"Retry-After": "1"} if status == 503 else None
            return _answer(status, {"error": str(exc)}, headers)
        rewards = [s.reward for s in scored]
        return _answer(200, {"rewards": rewards, "scores": rewards,
                             "extra_logs": {"r_i": [s.r_i for s in scored], "r_t": [s.r_t for s in scored]}})

    return app


class RewardServer:
    """uvicorn serving ``create_app`` around a scorer; binds at construction, so ``port`` is known
    before serving (port 0: a free one)."""

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = 0, max_batch: int = 64,
                 max_queue: int = 1024, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, image_root: Optional[str] = None):
        uvicorn = _server_libs()
        if timeout_s <= 0:
            raise ValueError(f"timeout_s (--timeout) must be > 0, got {timeout_s}.")
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes (--max-request-bytes) must be >= 1, got {max_request_bytes}.")
        root = None
        if image_root is not None:
            root = Path(image_root).resolve()
            if not root.is_dir():
                raise ValueError(f"--image-root {image_root} is not a directory; give the folder the label "
                                 "images are under.")
        # Many rollout workers connect at once: a deep backlog keeps their SYNs.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=2048)
        self._batcher = BatchingScorer(scorer, max_batch, max_queue)
        app = create_app(self._batcher, timeout_s, max_request_bytes, root)
        # log_config=None: uvicorn's records, access lines included, go to the `uvicorn.*` loggers,
        # which the CLI shows only with --verbose, instead of its own handlers on stdout / stderr.
        # The graceful-shutdown bound keeps a stuck scorer from holding Ctrl-C.
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off",
                                                     timeout_graceful_shutdown=5))
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._running = self._stopped = False

    @property
    def host(self) -> str:
        return self._socket.getsockname()[0]

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    def run(self) -> None:
        """Serve in this thread until ``stop`` (from another thread) or Ctrl-C."""
        with self._lock:
            if self._stopped:
                return
            self._running = True
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def start(self) -> "RewardServer":
        """Serve in a background thread; returns once requests are answered."""
        self._thread = threading.Thread(target=self.run, name="csr-reward-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the reward server did not start; see the uvicorn log (csr --verbose serve-reward).")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            running = self._running
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not running:  # never served: only the bound socket to release
            self._socket.close()
        self._batcher.close()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def remote_url(host: str, port: int, url_host: str = "") -> str:
    """The --reward.remote_url OpenRLHF's engines are given for a server bound to ``host``:``port``. A server
    on every interface (0.0.0.0, ::) is named by ``url_host`` or this machine's name, which other nodes can
    resolve; 127.0.0.1 is reachable from this machine only."""
    name = url_host or (socket.getfqdn() if host in ("0.0.0.0", "::", "") else host)
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"   # an IPv6 address in a URL
    return f"http://{name}:{port}/get_reward"


def serve(recipe: Recipe, host: str = "127.0.0.1", port: int = 0, max_batch: int = 64, max_queue: int = 1024,
          timeout_s: float = DEFAULT_TIMEOUT_S, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          image_root: Optional[str] = None, ready: Optional[Callable[[RewardServer], None]] = None) -> None:
    """Load the scorer and serve until stopped; ``ready(server)`` runs once the port is bound."""
    _server_libs()  # before minutes of model loading
    if timeout_s <= OPENRLHF_CLIENT_TIMEOUT_S:
        log.warning("--timeout %s s is not above OpenRLHF's %s s client timeout: a request its client still "
                    "waits for is answered 504 and retried (5 tries), queueing the work again; keep the default "
                    "%s s unless the clients are not OpenRLHF's.", timeout_s, OPENRLHF_CLIENT_TIMEOUT_S,
                    DEFAULT_TIMEOUT_S)
    server = RewardServer(ResponseRewardScorer.from_recipe(recipe), host, port, max_batch, max_queue, timeout_s,
                          max_request_bytes, image_root)
    log.info("CSR reward server on http://%s:%d/get_reward", server.host, server.port)
    try:
        if ready is not None:
            ready(server)
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
