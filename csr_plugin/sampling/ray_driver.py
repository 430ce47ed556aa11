"""`csr sample --ray`: the search of `csr sample`, sharded over Ray sampling actors.

The driver reads the prompts, skips the ids already in trees.jsonl and cuts the
rest into chunks of ``search.batch_prompts``. Each actor builds the engine and
CLIP once and searches one chunk per call; the driver keeps two chunks in
flight per actor, so an actor starts its next chunk without waiting for the
driver, and appends each finished chunk to trees.jsonl / errors.jsonl the
moment it arrives. The driver is the only writer: a killed driver resumes
exactly like `csr sample` (finished trees are on disk, the rest is redone).

An actor that dies loses only its unfinished chunks: they go back to the queue
and a fresh actor takes its place. The chunk it was running is charged one
attempt; after ``max_attempts`` a chunk is split into single prompts, and a
single prompt that keeps killing actors goes to errors.jsonl as "actor died".
"""
from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tqdm import tqdm

from csr_plugin.config import ConfigError, Recipe
from csr_plugin.sampling.local import SampleOutputs, SampleSummary, chunks
from csr_plugin.sampling.prompts import PromptRecord
from csr_plugin.sampling.ray_actors import SearchActors, import_ray

log = logging.getLogger(__name__)

def _needs_gpu(recipe: Recipe, cluster_gpus: float) -> bool:
    devices = (recipe.model.device, recipe.clip.device)
    # vLLM runs where its build runs: its CPU build on a cluster without GPUs, the CUDA build on a GPU.
    return ((recipe.search.engine == "vllm" and cluster_gpus > 0) or any(d.startswith("cuda") for d in devices)
            or ("auto" in devices and cluster_gpus > 0))


def default_actors(cluster_gpus: float, use_gpu: bool) -> int:
    """Actors when none are asked for: one per GPU of the cluster (every node's), or 2 CPU actors."""
    return max(1, int(cluster_gpus)) if use_gpu else 2


def _connect(ray, address: Optional[str]) -> bool:
    """Join `address` or start a local cluster; True if Ray was started here (so it is ours to shut down)."""
    from csr_plugin import run_logs

    if ray.is_initialized():
        return False
    quiet = run_logs.is_quiet()
    if quiet:   # Ray's own messages go to logs/csr.log; its errors still reach the terminal
        run_logs.adopt_logger("ray")
    # log_to_driver off: model-loading chatter from every actor would bury the progress bar; the
    # actors' logs stay in the Ray session folder (/tmp/ray/session_latest/logs), reported below.
    with warnings.catch_warnings():   # a tip about a future Ray default that does not concern CPU actors
        warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=not quiet)
    report_actor_logs()
    return True


def report_actor_logs() -> None:
    """Where the actors' stdout and stderr are: Ray's session logs folder on this node (linked as
    <output_dir>/logs/ray_session in quiet mode). Not known for a ray:// client connection."""
    from csr_plugin import run_logs

    try:
        from ray._private import worker

        logs = worker._global_node.get_logs_dir_path() if worker._global_node is not None else None
    except Exception:  # noqa: BLE001 - a Ray internal: only the report is lost
        logs = None
    if not logs:
        return
    link = run_logs.link_folder("ray_session", logs)
    if run_logs.is_quiet():
        print(f"Ray actors' logs: {logs}" + (f" (linked as {link})" if link else ""), flush=True)
    else:
        log.info("Ray actors' logs: %s", logs)


def _warn_if_cluster_too_small(ray, num_actors: int, use_gpu: bool) -> None:
    kind = "GPU" if use_gpu else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if have < num_actors:
        log.warning("%d sampling actors need one %s each but the Ray cluster has %d now; the others wait "
                    "until it has room (use --actors %d, or a cluster with more %ss).",
                    num_actors, kind, have, max(have, 1), kind)


def _reason(exc: BaseException) -> str:
    """A Ray error on one line for errors.jsonl, without the ids of the dead process (actor_id, pid, ip):
    a rerun that fails the same way then logs nothing new."""
    cause = getattr(exc, "cause", None)   # a RayTaskError carries the exception raised in the actor
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = " ".join(line for line in str(exc).splitlines() if not line.startswith("\t"))
    return " ".join(text.split())[:300]


@dataclass
class _Chunk:
    prompts: list[PromptRecord]
    failures: int = 0


@dataclass
class _Slot:
    actor: Any
    running: list = field(default_factory=list)   # its calls in flight, oldest first (Ray runs them in order)
    culprit: Any = None                            # once it died: the call it was running


class _Dispatcher:
    def __init__(self, ray, backend, outputs: SampleOutputs, bar: tqdm, work: list[_Chunk],
                 num_actors: int, max_attempts: int, on_progress: Optional[Callable[[int, list], None]]):
        self.ray, self.backend, self.outputs, self.bar = ray, backend, outputs, bar
        self.new_actor = backend.new_actor
        self.max_attempts, self.on_progress = max_attempts, on_progress
        self.queue = deque(work)
        self.slots = [_Slot(self.new_actor()) for _ in range(min(num_actors, len(work)))]
        self.in_flight: dict[Any, tuple[_Slot, _Chunk]] = {}   # in submission order

    def run(self) -> None:
        try:
            while self.queue or self.in_flight:
                self._submit()
                self.ray.wait(list(self.in_flight), num_returns=1)
                ready, _ = self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=0)
                ready = set(ready)
                # in submission order, so that a dead actor's running call is the first of its failures seen
                for ref in [r for r in self.in_flight if r in ready]:
                    self._collect(ref)
        finally:
            for slot in self.slots:
                self.ray.kill(slot.actor)

    def _submit(self) -> None:
        for depth in range(1, self.backend.in_flight_per_actor + 1):   # round robin: all get work before any two
            for slot in self.slots:
                if self.queue and len(slot.running) < depth:
                    chunk = self.queue.popleft()
                    ref = self.backend.submit(slot.actor, chunk.prompts)
                    slot.running.append(ref)
                    self.in_flight[ref] = (slot, chunk)

    def _collect(self, ref) -> None:
        slot, chunk = self.in_flight.pop(ref)
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:   # every actor would fail alike: a setup problem, not a prompt
                raise RuntimeError(f"a sampling actor could not load the models. Check model.path and the clip "
                                   f"section (the paths must exist on every Ray node).\n{exc}") from None
            if slot.culprit is None:    # first news of this death: replace the actor
                slot.culprit = slot.running[0]
                self.slots[self.slots.index(slot)] = _Slot(self.new_actor())
            if ref == slot.culprit:
                self._retry(chunk, f"actor died: {_reason(exc)}")
            else:                       # it was only waiting behind the chunk that killed the actor
                self.queue.appendleft(chunk)
        except self.ray.exceptions.RayError as exc:   # raised past the per-prompt isolation, or its result was lost
            self._retry(chunk, f"search failed: {_reason(exc)}")
        else:
            self.outputs.add(*self.backend.unpack(result))
            self.bar.update(len(chunk.prompts))
            if self.on_progress:
                self.on_progress(self.outputs.summary.done, [s.actor for s in self.slots])
        finally:
            slot.running.remove(ref)

    def _retry(self, chunk: _Chunk, reason: str) -> None:
        chunk.failures += 1
        if chunk.failures < self.max_attempts:
            self.queue.appendleft(chunk)
        elif len(chunk.prompts) > 1:   # one of them is the culprit: alone, the others still get searched
            self.queue.extendleft(_Chunk([p]) for p in reversed(chunk.prompts))
        else:
            prompt = chunk.prompts[0]
            self.outputs.add([], [{"id": prompt.id, "image": prompt.image,
                                   "reason": f"{reason} (after {chunk.failures} attempts)"}])
            self.bar.update(1)


def sample_on_ray(recipe: Recipe, num_actors: int, address: Optional[str] = None, progress: bool = True,
                  max_attempts: int = 3, on_progress: Optional[Callable[[int, list], None]] = None,
                  openrlhf_engines: bool = False, actor_env: Optional[dict] = None) -> SampleSummary:
    """`sample` on `num_actors` Ray actors: same trees.jsonl, errors.jsonl and resume behaviour.

    ``address``: an existing cluster (``auto``, ``ray://host:10001``, ``host:6379``); None starts a local
    one for this run. ``num_actors`` 0: one per GPU of the cluster when the actors take GPUs, else 2.
    ``on_progress(trees_written, live_actor_handles)`` runs after each finished chunk
    is on disk (tests kill an actor from it). ``openrlhf_engines``: the actors are OpenRLHF's vLLM
    rollout actors running our agent executor (openrlhf_actors.py) instead of our own sampling
    actors. ``actor_env``: extra environment variables for the actors.
    """
    if num_actors < 0:
        raise ValueError(f"--actors must be >= 1 (or 0: one per GPU of the cluster, 2 on CPUs), got {num_actors}.")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}.")
    if openrlhf_engines and recipe.search.decoding == "pargs":
        raise ConfigError("search.decoding: pargs cannot run on OpenRLHF's vLLM rollout actors (--openrlhf): vLLM "
                         "cannot run the reward model at every token. Drop --openrlhf (our own actors run PARGS), "
                         "or use search.decoding: sample.")
    ray = import_ray()
    started = time.monotonic()
    summary = SampleSummary()
    with SampleOutputs(recipe, summary) as outputs:
        if outputs.todo:
            owns_ray = _connect(ray, address)
            try:
                cluster_gpus = ray.cluster_resources().get("GPU", 0)
                use_gpu = _needs_gpu(recipe, cluster_gpus)
                if num_actors == 0:
                    num_actors = default_actors(cluster_gpus, use_gpu)
                    log.info("sampling on %d Ray actors (%s)", num_actors,
                             "one per GPU of the cluster" if use_gpu else "CPU actors")
                todo = outputs.todo
                if openrlhf_engines:
                    from csr_plugin.sampling.openrlhf_actors import OpenRLHFEngines, screen_prompts

                    todo, rejected = screen_prompts(todo)
                    outputs.add([], rejected)
                    use_gpu = ray.cluster_resources().get("GPU", 0) > 0   # vLLM itself decides the device
                    backend = OpenRLHFEngines(recipe, use_gpu, actor_env or {})
                else:
                    backend = SearchActors(recipe, use_gpu, actor_env)
                work = [_Chunk(c) for c in chunks(todo, backend.chunk_size)]
                _warn_if_cluster_too_small(ray, min(num_actors, len(work)), use_gpu)
                with tqdm(total=len(todo), desc="csr sample --ray", unit="prompt", disable=not progress) as bar:
                    _Dispatcher(ray, backend, outputs, bar, work, num_actors, max_attempts, on_progress).run()
            finally:
                if owns_ray:
                    ray.shutdown()
    summary.seconds = time.monotonic() - started
    return summary
