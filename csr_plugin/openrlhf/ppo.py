"""`csr train-ppo`: OpenRLHF's PPO / REINFORCE family with CSR rollouts and step-wise calibrated rewards.

We do not fork OpenRLHF's trainer: ``openrlhf.cli.train_ppo_ray`` runs as is,
with our agent executor in its vLLM rollout engines (``--train.agent_func_path``)
and, with ``ppo.dense_rewards``, the step-wise reward patch installed in its Ray
workers by a ``runtime_env`` setup hook (dense_rewards.py). This module turns a
recipe into that command: the prompt dataset in OpenRLHF's format, the dotted
flags, the Ray runtime environment, and the exact shell commands.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from csr_plugin.config import ConfigError, Recipe
from csr_plugin.openrlhf import AGENT_FILE

PPO_MODULE = "openrlhf.cli.train_ppo_ray"


class NoGPUError(RuntimeError):
    """OpenRLHF's PPO cannot run on this machine."""


def ppo_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / "ppo"


def write_ppo_prompts(recipe: Recipe) -> tuple[Path, int]:
    """data.prompts ({id, image, question}) -> OpenRLHF's prompt dataset; returns (path, prompts skipped).

    OpenRLHF's chat templating turns an ``<image>`` tag in the input into an image
    entry of the user message; the label carries the id and image for the agent.
    """
    from csr_plugin.jsonl import write_jsonl_atomic
    from csr_plugin.sampling.prompts import load_prompts

    prompts, bad = load_prompts(recipe.data.prompts, recipe.data.limit)
    usable = [p for p in prompts if p.question.strip()]
    if not usable:
        raise ConfigError(f"data.prompts {recipe.data.prompts!r} has no usable prompt (need id, image, question).")
    path = ppo_dir(recipe) / "prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, [{"input": f"<image>{p.question}", "images": [p.image],
                               "label": json.dumps({"id": p.id, "image": p.image})} for p in usable])
    return path, len(bad) + len(prompts) - len(usable)


def ppo_flags(recipe: Recipe, prompts_file: str | Path) -> dict[str, Any]:
    """The recipe as OpenRLHF train_ppo_ray's dotted flags (see to_argv for the command line)."""
    cfg, search, out = recipe.ppo, recipe.search, ppo_dir(recipe)
    samples = cfg.rollout_batch * cfg.n_samples_per_prompt
    ranks = cfg.nodes * cfg.gpus_per_node
    if samples // cfg.micro_rollout_batch < ranks:
        raise ConfigError(f"ppo.rollout_batch x ppo.n_samples_per_prompt = {samples} samples make fewer than one "
                          f"micro-batch of {cfg.micro_rollout_batch} per actor GPU ({ranks}); raise rollout_batch.")
    flags: dict[str, Any] = {
        "actor.model_name_or_path": recipe.model.path,
        "train.agent_func_path": str(AGENT_FILE),
        "data.prompt_dataset": str(prompts_file), "data.input_key": "input", "data.label_key": "label",
        "data.image_key": "images", "data.apply_chat_template": True, "data.max_len": cfg.max_len,
        "data.max_images_per_prompt": 1,
        "rollout.n_samples_per_prompt": cfg.n_samples_per_prompt, "rollout.batch_size": cfg.rollout_batch,
        "rollout.micro_batch_size": cfg.micro_rollout_batch,
        # The search sets each sentence's budget; this bounds the whole response for OpenRLHF.
        "rollout.max_new_tokens": search.max_new_tokens * search.max_sentences,
        "rollout.temperature": search.temperature, "rollout.top_p": search.top_p,
        "train.batch_size": cfg.train_batch, "train.micro_batch_size": cfg.micro_train_batch,
        "train.num_episodes": cfg.episodes, "train.max_epochs": cfg.epochs, "train.seed": cfg.seed,
        "train.colocate_all": cfg.colocate_all,
        "actor.num_nodes": cfg.nodes, "actor.num_gpus_per_node": cfg.gpus_per_node,
        "ref.num_nodes": cfg.nodes, "ref.num_gpus_per_node": cfg.gpus_per_node,
        "vllm.num_engines": cfg.vllm_engines, "vllm.tensor_parallel_size": cfg.vllm_tp,
        "vllm.gpu_memory_utilization": cfg.vllm_gpu_memory, "vllm.enable_prefix_caching": True,
        "vllm.enforce_eager": cfg.vllm_enforce_eager,
        "vllm.enable_sleep": cfg.colocate_all, "ds.enable_sleep": cfg.colocate_all,
        "algo.advantage.estimator": cfg.estimator, "algo.advantage.gamma": cfg.gamma,
        "algo.advantage.lambd": cfg.lambd, "algo.kl.init_coef": cfg.init_kl_coef,
        "algo.kl.estimator": cfg.kl_estimator, "algo.kl.use_loss": cfg.kl_in_loss,
        "actor.eps_clip": cfg.eps_clip, "reward.clip_range": list(cfg.reward_clip),
        "actor.adam.lr": cfg.actor_lr,
        "ds.zero_stage": cfg.zero_stage, "ds.param_dtype": "bf16", "ds.attn_implementation": cfg.attn_implementation,
        "ds.lora.rank": cfg.lora_rank or None, "ds.lora.alpha": cfg.lora_alpha if cfg.lora_rank else None,
        "actor.freeze_visual_encoder": cfg.freeze_vision,
        "actor.gradient_checkpointing_enable": cfg.gradient_checkpointing,
        "ckpt.output_dir": str(out / "final"), "ckpt.path": str(out / "ckpt"), "ckpt.save_steps": cfg.ckpt_steps,
        "ckpt.load_enable": True, "ckpt.save_hf": True, "logger.tensorboard_dir": str(out / "tensorboard"),
    }
    return flags


def to_argv(flags: dict[str, Any]) -> list[str]:
    """Dotted flags as a command line: True is a bare switch, False and None are left out."""
    argv = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if value is True:
            continue
        argv.extend(str(v) for v in value) if isinstance(value, (list, tuple)) else argv.append(str(value))
    return argv


def runtime_env(recipe: Recipe, config_path: str, overrides: list[str]) -> dict:
    """Ray runtime environment: the recipe for our agent, and the step-wise reward hook when asked for."""
    env_vars = {"CSR_RECIPE": str(Path(config_path).resolve()), "CSR_RECIPE_OVERRIDES": " ".join(overrides),
                "TOKENIZERS_PARALLELISM": "false"}
    if recipe.ppo.dense_rewards:
        from csr_plugin.openrlhf.dense_rewards import runtime_env as dense_runtime_env

        return dense_runtime_env(env_vars)
    return {"env_vars": env_vars}


def shell_commands(recipe: Recipe, config_path: str, overrides: list[str]) -> list[str]:
    """What `csr train-ppo` runs, as commands to paste on a Ray head node."""
    prompts = ppo_dir(recipe) / "prompts.jsonl"
    argv = to_argv(ppo_flags(recipe, prompts))
    env = runtime_env(recipe, config_path, overrides)
    address = recipe.ppo.ray_address if recipe.ppo.ray_address not in ("", "auto") else "http://127.0.0.1:8265"
    return [
        shlex.join(["csr", "train-ppo", "--config", config_path, *overrides, "--prepare-only"])
        + f"   # writes {prompts}",
        shlex.join(["ray", "job", "submit", "--address", address, "--runtime-env-json", json.dumps(env), "--",
                    "python3", "-m", PPO_MODULE, *argv]),
    ]


def train_ppo(recipe: Recipe, config_path: str, overrides: list[str]) -> int:
    """Run OpenRLHF's train_ppo_ray in this process, on a local or given Ray cluster."""
    import runpy

    import torch

    if not torch.cuda.is_available():
        raise NoGPUError("csr train-ppo needs GPUs: OpenRLHF's PPO places its models on GPUs and rolls out "
                           "with vLLM. `csr recipe show` prints the commands to run on a GPU cluster.")
    prompts, skipped = write_ppo_prompts(recipe)
    if skipped:
        print(f"csr train-ppo: {skipped} prompts skipped (no image or empty question); see `csr sample` errors.")
    import ray

    if not ray.is_initialized():
        # OpenRLHF's train() keeps a Ray that is already up, so our runtime_env reaches every worker.
        ray.init(address=recipe.ppo.ray_address or None, runtime_env=runtime_env(recipe, config_path, overrides))
    from csr_plugin.openrlhf.cli_args import argv_as

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with argv_as([PPO_MODULE, *to_argv(ppo_flags(recipe, prompts))]):
        runpy.run_module(PPO_MODULE, run_name="__main__", alter_sys=False)
    return 0
