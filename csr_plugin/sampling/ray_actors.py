"""Our own Ray sampling actors: each builds the engine and the visual term (CLIP or reward.mrm) once and
searches a chunk of prompts per call.

`ray_driver.sample_on_ray` dispatches chunks to these (or to OpenRLHF's rollout
actors, openrlhf_actors.py); both backends offer the driver the same members:
``chunk_size``, ``in_flight_per_actor``, ``new_actor()``, ``submit()`` and ``unpack()``.
"""
from __future__ import annotations

import functools
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


def _actor_options(use_gpu: bool, extra_env: Optional[dict] = None) -> dict:
    env = {"TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    if use_gpu:
        return {"num_cpus": 1, "num_gpus": 1, "runtime_env": {"env_vars": env}}
    # One core per actor: more torch threads than that only fight the other actors. flash-attn's
    # CPU install imports only with its Triton backend; on an NVIDIA GPU that variable would pick ROCm.
    cpu = {"OMP_NUM_THREADS": "1", "FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"}
    return {"num_cpus": 1, "runtime_env": {"env_vars": {**cpu, **env}}}


def actor_recipe(recipe: Recipe) -> dict:
    """The recipe as the actors need it: they run in Ray's own folder, each GPU actor sees one device."""
    data = recipe_to_dict(recipe)
    for section, key in (("model", "path"), ("clip", "config"), ("clip", "pretrained"), ("reward", "mrm"),
                         ("search", "rm")):
        value = data[section][key]
        if value and Path(value).exists():   # a local path, not a hub id or a pretrained tag
            data[section][key] = str(Path(value).resolve())
    for section in ("model", "clip"):
        if data[section]["device"].startswith("cuda"):
            data[section]["device"] = "cuda"   # Ray sets CUDA_VISIBLE_DEVICES to the actor's one GPU
    return data


class SearchActors:
    """Our sampling actors (transformers or vLLM engine inside): one chunk of prompts per call."""

    in_flight_per_actor = IN_FLIGHT_PER_ACTOR

    def __init__(self, recipe: Recipe, use_gpu: bool, extra_env: Optional[dict] = None):
        self.actor = _actor_class().options(max_restarts=0, **_actor_options(use_gpu, extra_env))
        self.recipe = actor_recipe(recipe)
        self.chunk_size = recipe.search.batch_prompts

    def new_actor(self):
        return self.actor.remote(self.recipe)

    def submit(self, actor, prompts: list[PromptRecord]):
        return actor.search_chunk.remote([asdict(p) for p in prompts])

    @staticmethod
    def unpack(result: dict) -> tuple[list[dict], list[dict]]:
        return result["trees"], result["errors"]
