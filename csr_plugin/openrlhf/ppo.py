"""`csr train-ppo`: OpenRLHF's PPO / REINFORCE family with CSR rollouts and step-wise calibrated rewards.

We do not fork OpenRLHF's trainer: ``openrlhf.cli.train_ppo_ray`` runs as is,
with our agent executor in its vLLM rollout engines (``--train.agent_func_path``)
and, with ``ppo.dense_rewards``, the step-wise reward patch installed in its Ray
workers by a ``runtime_env`` setup hook (dense_rewards.py). This module turns a
recipe into that command: the prompt dataset in OpenRLHF's format, the dotted
flags, the Ray runtime environment, and the exact shell commands.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
from pathlib import Path
from typing import Any, Optional

from csr_plugin.config import ConfigError, Recipe
from csr_plugin.openrlhf import AGENT_FILE

PPO_MODULE = "openrlhf.cli.train_ppo_ray"

# What every Ray worker of a PPO run gets through the runtime_env, on any node: the csr_plugin package
# (py_modules) and a working_dir, written under <output_dir>/ppo/, in which Ray starts each worker. OpenRLHF
# loads the agent file by path (spec_from_file_location) inside its vLLM actors, so the flag names a path
# relative to that working_dir, valid on every node; a head-node path (AGENT_FILE) is not.
WORKING_DIR = "ray_working_dir"
WORKER_RECIPE = "recipe.yaml"
WORKER_AGENT_FILE = "csr_agent.py"
WORKER_REWARD_FILE = "csr_reward_func.py"
_LOADED_BY_PATH = {  # file in the working_dir -> (what OpenRLHF loads from it, its flag)
    WORKER_AGENT_FILE: ("csr_plugin.openrlhf.agent", "AgentExecutor", "--train.agent_func_path"),
    WORKER_REWARD_FILE: ("csr_plugin.openrlhf.reward_func", "reward_func", "--reward.remote_url"),
}


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


# Flags csr sets from its own state rather than from one recipe key: refused in `ppo.openrlhf`.
PPO_RESERVED = {
    "train.agent_func_path": "csr's agent executor runs the sentence-level search",
    "data.prompt_dataset": "the prompts file csr writes from data.prompts", "data.input_key": "that file's format",
    "data.label_key": "that file's format", "data.image_key": "that file's format",
    "data.apply_chat_template": "that file's format", "ckpt.output_dir": "<output_dir>/ppo/final",
    "ckpt.path": "<output_dir>/ppo/ckpt", "logger.": "the recipe's logging: section",
}


def ppo_flags(recipe: Recipe, prompts_file: str | Path) -> dict[str, Any]:
    """The recipe as OpenRLHF train_ppo_ray's dotted flags, `ppo.openrlhf` applied (see to_argv for the
    command line)."""
    import dataclasses

    from csr_plugin.openrlhf.step_reward import check_step_reward
    from csr_plugin.passthrough import merge

    check_step_reward(recipe)   # on the recipe itself: the owner probing below varies keys one at a time

    def build(sections: dict) -> dict[str, Any]:
        return _own_ppo_flags(dataclasses.replace(recipe, **sections), prompts_file)

    sections = {"ppo": recipe.ppo, "search": recipe.search, "model": recipe.model}
    return merge(build(sections), recipe.ppo.openrlhf, "ppo.openrlhf", build, sections, PPO_RESERVED)


def _own_ppo_flags(recipe: Recipe, prompts_file: str | Path) -> dict[str, Any]:
    from csr_plugin.training.tracking import logger_flags

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
        "ckpt.load_enable": True, "ckpt.save_hf": True,
        **logger_flags(recipe.logging, out),   # wandb / TensorBoard: the recipe's logging section
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


def package_dir() -> Path:
    """The csr_plugin package folder this process imports: what runtime_env py_modules ships."""
    import csr_plugin

    return Path(csr_plugin.__file__).resolve().parent


def working_dir(recipe: Recipe) -> Path:
    return (ppo_dir(recipe) / WORKING_DIR).resolve()


def cluster_recipe(recipe: Recipe) -> Recipe:
    """The recipe as every node must see it: local paths absolute (the model, CLIP weights, output_dir and
    the prompts must be on storage every node mounts at the same path), one visible GPU per process."""
    from csr_plugin.config import recipe_from_dict
    from csr_plugin.sampling.ray_actors import actor_recipe

    data = actor_recipe(recipe)
    data["output_dir"] = str(Path(recipe.output_dir).resolve())
    if data["data"]["prompts"] and Path(data["data"]["prompts"]).exists():
        data["data"]["prompts"] = str(Path(data["data"]["prompts"]).resolve())
    return recipe_from_dict(data)


def write_working_dir(recipe: Recipe, config_path: str, overrides: list[str]) -> Path:
    """Write the Ray working_dir of a PPO run (ppo/ray_working_dir) and return it.

    It holds the recipe as the workers load it (overrides applied, paths absolute), a copy of the local
    CLIP config (a small file that often lives next to the recipe rather than on shared storage), and
    the files OpenRLHF loads by path, each importing its code from the shipped csr_plugin package.
    Weights are not shipped: Ray uploads the working_dir to every node for each job.
    """
    import shutil

    import yaml

    from csr_plugin.config import recipe_to_dict

    folder = working_dir(recipe)
    shutil.rmtree(folder, ignore_errors=True)   # nothing stale from an earlier recipe travels with this one
    folder.mkdir(parents=True)
    data = recipe_to_dict(cluster_recipe(recipe))
    clip_config = data["clip"]["config"]
    if clip_config and Path(clip_config).is_file():
        (folder / "clip").mkdir()
        shutil.copyfile(clip_config, folder / "clip" / Path(clip_config).name)
        data["clip"]["config"] = f"clip/{Path(clip_config).name}"   # relative: resolved in the worker's cwd
    header = (f"# Written by `csr train-ppo` from {shlex.join([str(config_path), *overrides])}: the recipe every\n"
              "# Ray worker of the run loads (CSR_RECIPE), overrides applied. Edit the source recipe, not this.\n")
    (folder / WORKER_RECIPE).write_text(header + yaml.safe_dump(data, sort_keys=False))
    for name, (module, attr, flag) in _LOADED_BY_PATH.items():
        (folder / name).write_text(
            f'"""OpenRLHF loads this file by path ({flag} {name}) in each Ray worker, whose working directory is\n'
            f'this folder; the code comes from the csr_plugin package shipped with the runtime_env py_modules."""\n'
            f"from {module} import {attr}  # noqa: F401\n")
    return folder


def launch_flags(recipe: Recipe, prompts_file: str | Path) -> dict[str, Any]:
    """ppo_flags for a Ray cluster: every path absolute or relative to the shipped working_dir."""
    flags = ppo_flags(cluster_recipe(recipe), Path(prompts_file).resolve())
    flags["train.agent_func_path"] = WORKER_AGENT_FILE
    return flags


def runtime_env(recipe: Recipe, cpu: bool = False) -> dict:
    """Ray runtime environment of a PPO run: csr_plugin (py_modules), the working_dir with the recipe and
    the agent file, CSR_RECIPE naming the shipped recipe, and the step-wise reward hook when asked for.

    Paths only: write_working_dir must have written the working_dir before Ray uploads it."""
    from csr_plugin.openrlhf.env_recipe import OVERRIDES_VAR, RECIPE_VAR, encode_overrides

    # The shipped recipe has the overrides applied already; an empty list also masks any value a node's
    # own environment might pass down to its workers.
    from csr_plugin.training.tracking import wandb_env

    env_vars = {RECIPE_VAR: WORKER_RECIPE, OVERRIDES_VAR: encode_overrides([]), "TOKENIZERS_PARALLELISM": "false",
                **wandb_env(recipe.logging, ppo_dir(recipe))}   # WANDB_MODE reaches the trainer actor
    if recipe.ppo.dense_rewards:
        from csr_plugin.openrlhf.dense_rewards import runtime_env as dense_runtime_env

        env = dense_runtime_env(env_vars)
    else:
        env = {"env_vars": env_vars}
    if cpu:
        from csr_plugin.openrlhf import ppo_on_cpu

        # one setup hook per job: the CPU one also runs the step-wise reward hook
        env["worker_process_setup_hook"] = ppo_on_cpu.HOOK
        env["env_vars"].update(ppo_on_cpu.worker_env())
    else:
        from csr_plugin.accelerator import flash_attn_env

        # OpenRLHF's actors import flash_attn: without its CUDA kernels only through the Triton switch
        env["env_vars"].update(flash_attn_env())
    return {**env, "working_dir": str(working_dir(recipe)), "py_modules": [str(package_dir())]}


def shell_commands(recipe: Recipe, config_path: str, overrides: list[str]) -> list[str]:
    """What `csr train-ppo` runs, as commands to paste on a Ray head node."""
    prompts = ppo_dir(recipe) / "prompts.jsonl"
    argv = to_argv(launch_flags(recipe, prompts))
    env = runtime_env(recipe)
    # OpenRLHF's train() calls ray.init with TOKENIZERS_PARALLELISM (read from its own environment) in its
    # env_vars, and inside a job Ray refuses a key that the job's runtime_env sets too ("Failed to merge the
    # Job's runtime env"): the variable goes into the entrypoint's environment instead.
    tokenizers = env["env_vars"].pop("TOKENIZERS_PARALLELISM")
    address = recipe.ppo.ray_address if recipe.ppo.ray_address not in ("", "auto") else "http://127.0.0.1:8265"
    return [
        shlex.join(["csr", "train-ppo", "--config", config_path, *overrides, "--prepare-only"])
        + f"   # writes {prompts} and {working_dir(recipe)}",
        shlex.join(["ray", "job", "submit", "--address", address, "--runtime-env-json", json.dumps(env), "--",
                    "env", f"TOKENIZERS_PARALLELISM={tokenizers}", "python3", "-m", PPO_MODULE, *argv]),
    ]


def runs_on_cpu(recipe: Recipe) -> bool:
    """Whether the run takes the CPU stand-ins of ppo_on_cpu.py, decided by the Ray cluster it runs on, as
    `csr sample --ray` decides: a CPU login or head node driving a GPU cluster (`ppo.ray_address`) must not
    install them (vLLM would sync weights over gloo while the trainer uses NCCL: a hang).

    - Ray already up in this process: what its runtime_env says (runtime_env(recipe, cpu) set it up);
    - `ppo.ray_address`: the cluster's GPUs, read over a short connection before the job's own. A cluster
      without GPUs is refused: OpenRLHF's placement groups would wait for GPUs forever;
    - a local cluster: Ray gives it this machine's GPUs, those torch can use (the preflight has checked
      that torch can use every GPU nvidia-smi lists).
    """
    import ray

    if ray.is_initialized():
        # imported here only: ppo_on_cpu imports OpenRLHF and vLLM, whose import noise would reach the terminal
        from csr_plugin.openrlhf.ppo_on_cpu import ENV_VAR

        return ray.get_runtime_context().runtime_env.get("env_vars", {}).get(ENV_VAR) == "1"
    if not recipe.ppo.ray_address:
        import torch

        return not torch.cuda.is_available()
    ray.init(address=recipe.ppo.ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
    finally:
        ray.shutdown()
    if gpus <= 0:
        raise ConfigError(f"the Ray cluster at ppo.ray_address={recipe.ppo.ray_address!r} has no GPUs. PPO runs on "
                          "GPU nodes (start them with `ray start --address ...` on each), or on this machine's CPU "
                          "with a local cluster: leave ppo.ray_address empty.")
    return False


def gpu_attention(recipe: Recipe) -> Recipe:
    """On GPUs: ppo.attn_implementation as the installed flash-attn allows (sdpa without its CUDA kernels,
    said in a warning; accelerator.py). Decided here for every node: they run the same install."""
    import dataclasses

    from csr_plugin.accelerator import attention

    chosen = attention(recipe.ppo.attn_implementation, "ppo.attn_implementation")
    if chosen == recipe.ppo.attn_implementation:
        return recipe
    return dataclasses.replace(recipe, ppo=dataclasses.replace(recipe.ppo, attn_implementation=chosen))


def train_ppo(recipe: Recipe, config_path: str, overrides: list[str]) -> int:
    """Run OpenRLHF's train_ppo_ray in this process, on a local or given Ray cluster; on a cluster without
    GPUs (a local one: this machine's CPU), with the CPU stand-ins of ppo_on_cpu.py."""
    import runpy

    from csr_plugin import run_logs

    cpu = runs_on_cpu(recipe)
    if cpu:
        check_cpu_recipe(recipe)
    else:
        recipe = gpu_attention(recipe)
    check_decoding(recipe)
    check_context(recipe)
    # quiet: what the libraries, Ray and train_ppo_ray print goes to logs/train_ppo.log (file descriptors
    # included: DeepSpeed's op checks print from compiler subprocesses); our stage lines to the terminal
    with _output_to(run_logs.subprocess_log(recipe.output_dir, "train_ppo")) as terminal:
        prompts, skipped = write_ppo_prompts(recipe)
        if skipped:
            print(f"csr train-ppo: {skipped} prompts skipped (no image or empty question); see `csr sample` "
                  "errors.", file=terminal, flush=True)
        write_working_dir(recipe, config_path, overrides)
        _start_ray(recipe, cpu, terminal)
        from csr_plugin.openrlhf.cli_args import argv_as

        flags = launch_flags(recipe, prompts)
        _fail_fast_on_engines()
        if cpu:
            from csr_plugin.openrlhf.ppo_on_cpu import install_driver

            install_driver(recipe)
            flags.update(CPU_FLAGS)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        print(f"csr train-ppo: OpenRLHF train_ppo_ray, {recipe.ppo.estimator}, "
              f"{'step-wise' if recipe.ppo.dense_rewards else 'response'} rewards"
              f"{', CPU stand-ins (no CUDA)' if cpu else ''}", file=terminal, flush=True)
        with argv_as([PPO_MODULE, *to_argv(flags)]):
            runpy.run_module(PPO_MODULE, run_name="__main__", alter_sys=False)
        add_processor(recipe, [Path(flags["ckpt.output_dir"]), *Path(flags["ckpt.path"]).glob("*_hf")])
        print(f"csr train-ppo: done: model {flags['ckpt.output_dir']}, checkpoints {flags['ckpt.path']}",
              file=terminal, flush=True)
    return 0


def add_processor(recipe: Recipe, folders: list[Path]) -> None:
    """OpenRLHF's PPO actor saves its HF checkpoints with a tokenizer, not the VLM's processor: without the
    image processor's config, `csr eval`, `csr sample` or AutoProcessor cannot load them. PPO does not
    change the processor, so the starting model's is saved next to the weights."""
    from transformers import AutoProcessor

    folders = [f for f in folders if (f / "config.json").is_file() and not (f / "processor_config.json").is_file()
               and not (f / "preprocessor_config.json").is_file()]
    if folders:
        processor = AutoProcessor.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
        for folder in folders:
            processor.save_pretrained(folder)


def _fail_fast_on_engines() -> None:
    """train_ppo_ray starts its vLLM actors and moves on; an engine that fails to start (a bad engine
    argument, too little memory) then surfaces only as a trainer rank waiting for it in the weight-sync
    rendezvous until its timeout. Waiting for the engines right after they start stops the run there,
    with the engine's own error."""
    import openrlhf.trainer.ray as openrlhf_ray
    import ray

    create = openrlhf_ray.create_vllm_engines
    if getattr(create, "_csr_waits", False):
        return

    def create_vllm_engines(*args, **kwargs):
        engines = create(*args, **kwargs)
        ray.get([engine.__ray_ready__.remote() for engine in engines])
        return engines

    create_vllm_engines._csr_waits = True
    openrlhf_ray.create_vllm_engines = create_vllm_engines   # the name train_ppo_ray imports when it runs


def check_decoding(recipe: Recipe) -> None:
    """PPO's rollouts are OpenRLHF's vLLM engines. Its plain one-request path (search.candidates 1) never
    meets the vLLM engine's own refusal, so another decoding would silently be plain sampling."""
    if recipe.search.decoding != "sample":
        raise ConfigError(
            f"`search.decoding: {recipe.search.decoding}` is not available in PPO: its rollouts run on OpenRLHF's "
            "vLLM engines, which sample (group beam search and PARGS need the transformers engine of "
            "`csr sample`). Set `search.decoding: sample`.")


def check_context(recipe: Recipe) -> None:
    """ppo.max_len within the model's context: vLLM refuses a longer max_model_len, from inside an actor."""
    from transformers import AutoConfig

    from csr_plugin.model_source import context_length

    limit = context_length(AutoConfig.from_pretrained(recipe.model.path,
                                                      trust_remote_code=recipe.model.trust_remote_code))
    if recipe.ppo.max_len > limit:
        raise ConfigError(f"ppo.max_len={recipe.ppo.max_len} is longer than {recipe.model.path}'s context "
                          f"({limit} tokens): set ppo.max_len <= {limit}.")


def _start_ray(recipe: Recipe, cpu: bool, terminal) -> None:
    import ray

    from csr_plugin import run_logs

    if ray.is_initialized():
        if ray.get_runtime_context().runtime_env.get("env_vars", {}).get("CSR_RECIPE") != WORKER_RECIPE:
            # Without our runtime_env no worker has the agent file or the recipe: fail here, not in every engine.
            raise RuntimeError("Ray is already initialised in this process without csr's runtime_env; call "
                               "ray.shutdown() first, or ray.init(runtime_env=csr_plugin.openrlhf.ppo.runtime_env("
                               "recipe)).")
        return   # OpenRLHF's train() keeps a Ray that is already up, so our runtime_env reaches every worker
    from csr_plugin.openrlhf.ppo_on_cpu import ray_resources
    from csr_plugin.sampling.ray_driver import report_actor_logs

    quiet = run_logs.is_quiet()
    local = ray_resources(recipe.ppo) if cpu and not recipe.ppo.ray_address else {}
    if quiet:   # every actor's output stays in the Ray session's log folder, reported below
        run_logs.adopt_logger("ray")
    ray.init(address=recipe.ppo.ray_address or None, runtime_env=runtime_env(recipe, cpu=cpu),
             include_dashboard=False, log_to_driver=not quiet, configure_logging=not quiet, **local)
    with contextlib.redirect_stdout(terminal):
        report_actor_logs()


@contextlib.contextmanager
def _output_to(path: Optional[Path]):
    """Yield the terminal; with a path, this process's stdout and stderr (file descriptors 1 and 2, so
    subprocesses and C libraries too) go to that file meanwhile."""
    import sys

    if path is None:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "a") as sink, os.fdopen(os.dup(saved[0]), "w") as terminal:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield terminal
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


# Without CUDA: weights reach vLLM over gloo (ppo_on_cpu.GlooBroadcastGroup; OpenRLHF's "nccl" would
# take the CUDA IPC path), and vLLM runs without graphs.
CPU_FLAGS = {"vllm.sync_backend": "gloo", "vllm.enforce_eager": True}


def check_cpu_recipe(recipe: Recipe) -> None:
    """What a recipe cannot ask for on a machine without CUDA, with the setting that works."""
    cfg = recipe.ppo
    if cfg.colocate_all:
        raise ConfigError("ppo.colocate_all: true needs GPUs (vLLM sleep mode and CUDA IPC weight sync); set "
                          "ppo.colocate_all=false on a machine without CUDA.")
    if cfg.attn_implementation.startswith("flash"):
        raise ConfigError(f"ppo.attn_implementation: {cfg.attn_implementation} is a CUDA kernel; set "
                          "ppo.attn_implementation=sdpa (or eager) on a machine without CUDA.")
    if cfg.vllm_tp != 1:
        raise ConfigError("ppo.vllm_tp > 1 runs vLLM workers through Ray with NCCL; set ppo.vllm_tp=1 on a "
                          "machine without CUDA.")
