"""Our own Ray sampling actors: each builds the engine and the visual term (CLIP or reward.mrm) once and
searches a chunk of prompts per call.

`ray_driver.sample_on_ray` dispatches chunks to these (or to OpenRLHF's rollout
actors, openrlhf_actors.py); both backends offer the driver the same members:
``chunk_size``, ``in_flight_per_actor``, ``new_actor()``, ``submit()`` and ``unpack()``.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from csr_plugin.config import Recipe, recipe_from_dict, recipe_to_dict
from csr_plugin.sampling.local import build_clip, build_engine, search_prompts
from csr_plugin.sampling.prompts import PromptRecord
from csr_plugin.sampling.search import SentenceBeamSearch

# One chunk running and one waiting on the actor: it never idles while the driver writes a result.
IN_FLIGHT_PER_ACTOR = 2


class SamplingWorker:
    """The body of a sampling actor (made a Ray actor by `_actor_class`): engine and CLIP built once."""

    def __init__(self, recipe: dict):
        recipe = recipe_from_dict(recipe)
        self.engine = build_engine(recipe)
        self.search = SentenceBeamSearch(self.engine, build_clip(recipe), recipe.search, recipe.reward,
                                         recipe.curation)

    def search_chunk(self, prompts: list[dict]) -> dict:
        trees, errors = search_prompts(self.search, self.engine, [PromptRecord(**p) for p in prompts])
        return {"trees": trees, "errors": errors}


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("`csr sample --ray` needs Ray: pip install ray "
                          "(or run `csr sample` without --ray).") from None
    return ray


@functools.cache
def _actor_class():
    return import_ray().remote(SamplingWorker)


def engine_gpus(recipe: Recipe) -> int:
    """GPUs one sampling actor needs: its vLLM engine's tensor-parallel size (search.vllm), else one."""
    if recipe.search.engine != "vllm":
        return 1
    return int(recipe.search.vllm.get("tensor_parallel_size", 1))


def _actor_options(use_gpu: bool, extra_env: Optional[dict] = None, gpus: int = 1) -> dict:
    env = {"TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    if use_gpu:
        from csr_plugin.accelerator import flash_attn_env

        # flash-attn without its CUDA kernels imports only with its Triton switch (accelerator.py)
        return {"num_cpus": 1, "num_gpus": gpus, "runtime_env": {"env_vars": {**flash_attn_env(), **env}}}
    # One core per actor: more torch threads than that only fight the other actors. flash-attn's
    # CPU install imports only with its Triton backend; on an NVIDIA GPU that variable would pick ROCm.
    cpu = {"OMP_NUM_THREADS": "1", "FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"}
    return {"num_cpus": 1, "runtime_env": {"env_vars": {**cpu, **env}}}


def actor_recipe(recipe: Recipe) -> dict:
    """The recipe as the actors need it: they run in Ray's own folder, each GPU actor sees one device."""
    data = recipe_to_dict(recipe)
    for section, key in (("model", "path"), ("clip", "config"), ("clip", "pretrained"), ("reward", "mrm"),
                         ("reward", "claim_vocabulary"), ("search", "rm")):
        value = data[section][key]
        if value and Path(value).exists():   # a local path, not a hub id or a pretrained tag
            data[section][key] = str(Path(value).resolve())
    for section in ("model", "clip"):
        if data[section]["device"].startswith("cuda"):
            # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs (engine_gpus of them): the first is where a
            # tensor-parallel engine's rank 0 runs, so CLIP shares the engine's own device.
            data[section]["device"] = "cuda:0"
    return data


def engine_device(device: str) -> str:
    """The device for CLIP (or reward.mrm) inside one of OpenRLHF's vLLM rollout actors: ``device`` unless
    the engine is tensor-parallel (``ppo.vllm_tp`` > 1). Such an actor holds no GPU itself: OpenRLHF removes
    its CUDA_VISIBLE_DEVICES, so "cuda" would be GPU 0 of the node for every engine there, and its vLLM
    workers run on the placement-group bundles named in VLLM_RAY_BUNDLE_INDICES. A probe task in the first
    of those bundles, run before the workers take them, reads the GPU Ray gave that bundle: the device of
    the engine's rank 0."""
    import os

    bundles = os.environ.get("VLLM_RAY_BUNDLE_INDICES")
    if not bundles or not (device == "auto" or device.startswith("cuda")):
        return device
    ray = import_ray()
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.get_current_placement_group()
    if group is None:
        return device
    first = int(bundles.split(",")[0])
    # a sliver of a GPU: any share of the bundle reports its GPU, and with colocate_all the bundle's GPU is
    # already shared out to the trainer's actors
    probe = ray.remote(num_cpus=0, num_gpus=0.01)(_gpu_ids).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=first))
    try:
        ids = ray.get(probe.remote(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        ids = []
    if not ids:
        logging.getLogger(__name__).warning(
            "could not read the GPU of placement-group bundle %d (no room for a probe in 120 s): CLIP stays on %s, "
            "GPU 0 of this node", first, device)
        return device
    # with CUDA_VISIBLE_DEVICES removed, torch's index on this node is Ray's GPU id
    return f"cuda:{ids[0]}"


def _gpu_ids() -> list:
    import ray

    return ray.get_gpu_ids()


class SearchActors:
    """Our sampling actors (transformers or vLLM engine inside): one chunk of prompts per call."""

    in_flight_per_actor = IN_FLIGHT_PER_ACTOR

    def __init__(self, recipe: Recipe, use_gpu: bool, extra_env: Optional[dict] = None):
        self.actor = _actor_class().options(max_restarts=0,
                                            **_actor_options(use_gpu, extra_env, engine_gpus(recipe)))
        self.recipe = actor_recipe(recipe)
        self.chunk_size = recipe.search.batch_prompts

    def new_actor(self):
        return self.actor.remote(self.recipe)

    def submit(self, actor, prompts: list[PromptRecord]):
        return actor.search_chunk.remote([asdict(p) for p in prompts])

    @staticmethod
    def unpack(result: dict) -> tuple[list[dict], list[dict]]:
        return result["trees"], result["errors"]
