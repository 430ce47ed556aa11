"""`csr recipe show`: the exact commands a recipe runs (csr, torchrun / deepspeed, OpenRLHF on Ray)."""
from __future__ import annotations

import shlex
from pathlib import Path

from csr_plugin.config import Recipe
from csr_plugin.openrlhf.ppo import shell_commands as ppo_commands
from csr_plugin.openrlhf.ppo import to_argv
from csr_plugin.training.launch import worker_command
from csr_plugin.training.openrlhf_args import dpo_flags


def _csr(*parts: str) -> str:
    return shlex.join(["csr", *parts])


def dpo_iteration(recipe: Recipe, config_path: str, overrides: list[str], t: int) -> dict[str, list[str]]:
    """Iteration t of `csr run`: the folders and models pipeline.run uses (iterate t-1 samples and is the reference)."""
    out = Path(recipe.output_dir) / f"iter_{t}"
    model = recipe.model.path if t == 1 else str(Path(recipe.output_dir) / f"iter_{t - 1}" / "dpo" / "final")
    pairs, dpo_dir = str(out / "pairs.jsonl"), str(out / "dpo")
    return {
        "sample": ["sample", "--config", config_path, *overrides, f"model.path={model}",
                   f"search.seed={recipe.search.seed + 1000 * t}", f"output_dir={out}"],
        "curate": ["curate", "--trees", str(out / "trees.jsonl"), "--out", pairs, "--config", config_path,
                   *overrides],
        "dpo": worker_command(recipe, config_path, overrides, model, pairs, dpo_dir),
        "openrlhf_dpo_flags": to_argv(_openrlhf_dpo_flags(recipe, model, pairs, dpo_dir)),
    }


def _openrlhf_dpo_flags(recipe: Recipe, model: str, pairs: str, dpo_dir: str) -> dict:
    """Our DPO ranks' flags as OpenRLHF's train_dpo CLI would take them, for the GPU cluster the commands
    are meant for whatever machine prints them. Its CLI has no fp32 (our CPU worker runs fp32): an
    explicit `dpo.dtype: fp32` is left to OpenRLHF's default there."""
    flags = dpo_flags(recipe.dpo, model, pairs, dpo_dir, gpu=True)
    if flags["ds.param_dtype"] == "fp32":
        del flags["ds.param_dtype"]
    return flags


def show(recipe: Recipe, config_path: str, overrides: list[str]) -> str:
    step = dpo_iteration(recipe, config_path, overrides, 1)
    lines = [
        f"# CSR-DPO loop: {recipe.loop.iterations} iterations, all stages resumable",
        _csr("run", "--config", config_path, *overrides),
        "",
        "# which runs, for iteration t = 1 (later iterations sample with and train from iter_<t-1>/dpo/final):",
        _csr(*step["sample"]),
        _csr(*step["curate"]),
        shlex.join(step["dpo"]),
        "# the DPO ranks build OpenRLHF's DeepspeedStrategy and DPOTrainer from these train_dpo flags:",
        "#   " + shlex.join(step["openrlhf_dpo_flags"]),
        "",
        f"# sampling on a Ray cluster instead ({recipe.search.engine} engine per actor):",
        _csr("sample", "--config", config_path, *overrides, "--ray", "--actors", "8", "--ray-address", "auto"),
        "# or on OpenRLHF's vLLM rollout actors running our agent executor (the PPO rollout code):",
        _csr("sample", "--config", config_path, *overrides, "--ray", "--openrlhf", "--actors", "8",
             "--ray-address", "auto"),
        "",
        f"# PPO / REINFORCE with CSR rollouts (estimator {recipe.ppo.estimator}, "
        f"{'step-wise' if recipe.ppo.dense_rewards else 'one scalar per response'} rewards); "
        "`csr train-ppo --config ...` does both on a local Ray:",
        *ppo_commands(recipe, config_path, overrides),
        "",
        "# reward only, for an OpenRLHF run of your own (one calibrated reward per response):",
        f"#   --reward.remote_url {Path(__file__).parent / 'openrlhf' / 'reward_func.py'}   (with CSR_RECIPE set)",
        "#   or: " + _csr("serve-reward", "--config", config_path, *overrides) +
        "  ->  --reward.remote_url http://127.0.0.1:5000/get_reward",
    ]
    return "\n".join(lines)


def check(recipe: Recipe, config_path: str, overrides: list[str]) -> list[str]:
    """Parse the generated OpenRLHF flags with OpenRLHF's own entry points; returns what was checked."""
    from csr_plugin.openrlhf.cli_args import parse_openrlhf_args
    from csr_plugin.openrlhf.ppo import PPO_MODULE, ppo_dir, ppo_flags

    parse_openrlhf_args("openrlhf.cli.train_dpo", dpo_iteration(recipe, config_path, overrides, 1)["openrlhf_dpo_flags"])
    parse_openrlhf_args(PPO_MODULE, to_argv(ppo_flags(recipe, ppo_dir(recipe) / "prompts.jsonl")))
    return ["openrlhf.cli.train_dpo", PPO_MODULE]

