"""`csr sample --ray --openrlhf`: CSR data generation on OpenRLHF's own vLLM rollout actors.

Each actor is OpenRLHF's ``RolloutRayActor`` (an async vLLM engine) with our agent
executor loaded by ``agent_func_path``, exactly as in PPO; the driver sends one
prompt per call and keeps ``search.batch_prompts`` calls in flight per engine,
so vLLM batches the searches of many prompts at once. Labels ask for
deterministic seeding, so a prompt's tree depends on ``search.seed`` and its id
alone, as in `csr sample`. Trees come back in the agent's ``csr_tree`` and go
through the same resumable writer, retry and dead-actor handling as our own
sampling actors (ray_driver.py).

We build the actors ourselves rather than through ``create_vllm_engines``: that
helper hard-codes ``trust_remote_code=True``, a weight-sync worker extension
that offline sampling has no use for, GPU bundles in a placement group, and no way
to pass engine arguments (``search.vllm``: on CPU vLLM needs some to run at all);
the actor class and its kwargs are OpenRLHF's.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from csr_plugin.accelerator import vllm_dtype
from csr_plugin.config import Recipe
from csr_plugin.model_source import context_length
from csr_plugin.multimodal import chat_prompt, processor_image_token_id
from csr_plugin.openrlhf import AGENT_FILE
from csr_plugin.sampling.prompts import PromptError, PromptRecord, check_prompt
from csr_plugin.sampling.ray_actors import actor_recipe


def screen_prompts(prompts: list[PromptRecord]) -> tuple[list[PromptRecord], list[dict]]:
    """The checks `csr sample` makes before a search, done by the driver: a bad prompt never reaches an engine."""
    good, rejected = [], []
    for prompt in prompts:
        try:
            check_prompt(prompt)
        except PromptError as exc:
            rejected.append({"id": prompt.id, "image": prompt.image, "reason": str(exc)})
        else:
            good.append(prompt)
    return good, rejected


def _context_length(path: str, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def rollout_actor_kwargs(recipe: Recipe, use_gpu: bool, processor) -> dict:
    """What RolloutRayActor gets: OpenRLHF's own actor arguments, our agent, and the vLLM engine
    arguments of `search.vllm` over our defaults (the CPU ones without a GPU)."""
    from csr_plugin.sampling.vllm_engine import engine_args

    model = recipe.model
    image_token = processor_image_token_id(processor)
    gpus = 1 if use_gpu else 0
    kwargs = dict(
        model=model.path, tensor_parallel_size=1, seed=recipe.search.seed, distributed_executor_backend="uni",
        enable_prefix_caching=True, trust_remote_code=model.trust_remote_code,
        dtype=vllm_dtype(model.dtype),
        max_model_len=_context_length(model.path, model.trust_remote_code), limit_mm_per_prompt={"image": 1},
        full_determinism=False, bundle_indices=None, num_gpus=gpus, agent_func_path=str(AGENT_FILE),
        remote_rm_url=None, mm_pad_token_ids={image_token} if image_token is not None else set())
    kwargs.update(engine_args(recipe.search, cpu=not use_gpu, max_model_len=kwargs["max_model_len"]))
    return kwargs


class OpenRLHFEngines:
    """The dispatcher's view of OpenRLHF rollout actors: how to start one and what one call returns."""

    chunk_size = 1

    def __init__(self, recipe: Recipe, use_gpu: bool, extra_env: dict):
        from transformers import AutoProcessor

        from csr_plugin.accelerator import flash_attn_env
        from csr_plugin.sampling.vllm_engine import cpu_openrlhf_env, import_vllm

        import_vllm()  # the driver unpickles vLLM objects and imports OpenRLHF's actor module
        from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

        model = recipe.model
        self.processor = AutoProcessor.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        self.kwargs = rollout_actor_kwargs(recipe, use_gpu, self.processor)
        self.max_length = self.kwargs["max_model_len"]
        self.in_flight_per_actor = max(1, recipe.search.batch_prompts)
        # The agent keeps OpenRLHF's temperature / top-p and sets everything else per search step.
        self.params = import_vllm().SamplingParams(temperature=recipe.search.temperature, top_p=recipe.search.top_p,
                                                   max_tokens=None)
        # The agent reads its recipe from CSR_RECIPE: the actor's view of it (absolute paths) on disk.
        recipe_file = Path(recipe.output_dir).resolve() / "openrlhf_engine_recipe.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(yaml.safe_dump(actor_recipe(recipe), sort_keys=False))
        env = {"CSR_RECIPE": str(recipe_file), "CSR_RECIPE_OVERRIDES": "[]", "TOKENIZERS_PARALLELISM": "false",
               **(flash_attn_env() if use_gpu else cpu_openrlhf_env()), **extra_env}
        self.actor = RolloutRayActor.options(num_cpus=1, num_gpus=self.kwargs["num_gpus"], max_restarts=0,
                                             runtime_env={"env_vars": env})

    def new_actor(self):
        return self.actor.remote(**self.kwargs)

    def submit(self, actor, prompts: list[PromptRecord]):
        [prompt] = prompts
        label = json.dumps({"id": prompt.id, "image": prompt.image, "question": prompt.question,
                            "deterministic": True})
        return actor.generate_responses.remote(
            prompt=chat_prompt(self.processor, prompt.question), label=label, sampling_params=self.params,
            max_length=self.max_length, hf_tokenizer=self.processor, num_samples=1, images=[prompt.image])

    @staticmethod
    def unpack(responses: list[dict]) -> tuple[list[dict], list[dict]]:
        return [response["csr_tree"] for response in responses], []
