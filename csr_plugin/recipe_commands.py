"""`csr recipe show`: the exact commands a recipe runs (csr, torchrun / deepspeed, OpenRLHF on Ray)."""
from __future__ import annotations

import shlex

import yaml
from pathlib import Path

from csr_plugin.config import Recipe
from csr_plugin.openrlhf.ppo import shell_commands as ppo_commands
from csr_plugin.openrlhf.ppo import to_argv
from csr_plugin.training.launch import worker_command
from csr_plugin.training.openrlhf_args import dpo_flags


def _csr(*parts: str) -> str:
    return shlex.join(["csr", *parts])


def dpo_iteration(recipe: Recipe, config_path: str, overrides: list[str], t: int,
                  gpu: bool) -> dict[str, list[str]]:
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
        "openrlhf_dpo_flags": to_argv(_openrlhf_dpo_flags(recipe, model, pairs, dpo_dir, gpu)),
    }


def _openrlhf_dpo_flags(recipe: Recipe, model: str, pairs: str, dpo_dir: str, gpu: bool) -> dict:
    """Our DPO ranks' flags as OpenRLHF's train_dpo CLI would take them. Its CLI has no fp32 (our CPU
    worker runs fp32): there the flag is left out, and show() says which dtype the ranks use."""
    flags = dpo_flags(recipe.dpo, model, pairs, dpo_dir, gpu=gpu)
    if flags["ds.param_dtype"] == "fp32":
        del flags["ds.param_dtype"]
    return flags


def pipelines(config_path: str, overrides: list[str]) -> list[str]:
    """What a recipe runs, in the order show() prints it: "dpo" (the CSR-DPO loop: a dpo: or loop: section),
    "rm" (`csr train-rm`), "ppo" (`csr train-ppo`), "eval" (`csr eval`: eval.prompts set or eval. overrides).
    A section the recipe leaves out holds only defaults, which nothing of the recipe runs."""
    has = {s: uses_section(config_path, overrides, s) for s in ("dpo", "loop", "rm", "ppo", "eval")}
    return [name for name, present in (("dpo", has["dpo"] or has["loop"]), ("rm", has["rm"]),
                                       ("ppo", has["ppo"]), ("eval", has["eval"])) if present]


def stage_dtypes(recipe: Recipe, gpu: bool) -> dict[str, str]:
    """The dtype each stage computes in on a machine with (``gpu``) or without a CUDA GPU, as the code that
    runs the stage resolves it: sampling and eval as accelerator.dtype_name (vLLM as vllm_dtype), DPO and
    the reward model as training/openrlhf_args.param_dtype. PPO's is its --ds.param_dtype flag (show())."""
    from csr_plugin.accelerator import dtype_name, vllm_dtype
    from csr_plugin.reward_model.train_main import as_dpo_config
    from csr_plugin.training.openrlhf_args import param_dtype

    # a transformers engine on model.device: cpu computes in float32 whatever the machine has
    engine_gpu = gpu and recipe.model.device != "cpu"
    sampling = (vllm_dtype(recipe.model.dtype) if recipe.search.engine == "vllm"
                else dtype_name(recipe.model.dtype, engine_gpu))
    return {"sample": sampling, "eval": dtype_name(recipe.model.dtype, engine_gpu),
            "dpo": param_dtype(recipe.dpo, gpu), "rm": param_dtype(as_dpo_config(recipe.rm), gpu)}


def show(recipe: Recipe, config_path: str, overrides: list[str], gpu: bool | None = None) -> str:
    """The commands of the pipelines the recipe has (pipelines()), each with the dtype it uses on this
    machine (``gpu``: whether torch sees a CUDA GPU; None = ask torch)."""
    from csr_plugin.openrlhf.reward_server import remote_url
    from csr_plugin.training.device import on_gpu

    gpu = on_gpu() if gpu is None else gpu
    has = pipelines(config_path, overrides)
    dtypes = stage_dtypes(recipe, gpu)
    here = "a CUDA GPU" if gpu else "CPU only (torch sees no CUDA GPU)"
    names = {"dpo": f"CSR-DPO loop ({recipe.loop.iterations} iterations)", "rm": "reward model",
             "ppo": f"PPO ({recipe.ppo.estimator})", "eval": "evaluation"}
    lines = [f"# {config_path}: {', '.join(names[p] for p in has) or 'sampling only'}; here: {here}", ""]
    if "dpo" in has:
        step = dpo_iteration(recipe, config_path, overrides, 1, gpu)
        lines += [
            "# the CSR-DPO loop, all stages resumable:",
            _csr("run", "--config", config_path, *overrides),
            "# which runs, for iteration t = 1 (later iterations sample with and train from iter_<t-1>/dpo/final):",
            _csr(*step["sample"]) + f"   # {recipe.search.engine} engine, {dtypes['sample']}",
            _csr(*step["curate"]),
            shlex.join(step["dpo"]) + f"   # DPO in {dtypes['dpo']}",
            "# the DPO ranks build OpenRLHF's DeepspeedStrategy and DPOTrainer from these train_dpo flags:",
            "#   " + shlex.join(step["openrlhf_dpo_flags"]),
            "",
            f"# sampling on a Ray cluster instead ({recipe.search.engine} engine per actor):",
            _csr("sample", "--config", config_path, *overrides, "--ray", "--actors", "8", "--ray-address", "auto"),
            "# or on OpenRLHF's vLLM rollout actors running our agent executor (the PPO rollout code):",
            _csr("sample", "--config", config_path, *overrides, "--ray", "--openrlhf", "--actors", "8",
                 "--ray-address", "auto"),
            "",
        ]
    elif "ppo" not in has:   # a recipe with neither loop: what `csr sample` does with it
        lines += [f"# CSR sampling ({recipe.search.engine} engine, {dtypes['sample']}):",
                  _csr("sample", "--config", config_path, *overrides), ""]
    if "rm" in has:
        lines += [f"# the reward model (`rm:` section), {dtypes['rm']}; --pairs or rm.pairs:",
                  _csr("train-rm", "--config", config_path, *overrides), ""]
    if "ppo" in has:
        from csr_plugin.openrlhf.ppo import ppo_flags

        # OpenRLHF's PPO trains bf16 or fp16 only, on a CPU too (docs/ppo.md, "Without CUDA")
        dtypes["ppo"] = ppo_flags(recipe, "prompts.jsonl")["ds.param_dtype"]
        lines += [f"# PPO / REINFORCE with CSR rollouts (estimator {recipe.ppo.estimator}, "
                  f"{'step-wise' if recipe.ppo.dense_rewards else 'one scalar per response'} rewards, "
                  f"{dtypes['ppo']}); `csr train-ppo --config ...` does both on a local Ray:",
                  *ppo_commands(recipe, config_path, overrides), ""]
    if "eval" in has:
        lines += [f"# hallucination of a checkpoint (CHAIR, POPE; {dtypes['eval']}):",
                  _csr("eval", "--config", config_path, *overrides, "--model", "CHECKPOINT"), ""]
    lines += [
        "# reward only, for an OpenRLHF run of your own (one calibrated reward per response):",
        f"#   --reward.remote_url {Path(__file__).parent / 'openrlhf' / 'reward_func.py'}   (with CSR_RECIPE set)",
        "#   or: " + _csr("serve-reward", "--config", config_path, *overrides) +
        f"  ->  --reward.remote_url {remote_url(recipe.serve.host, recipe.serve.port, recipe.serve.url_host)}",
    ]
    return "\n".join(lines)


DPO_WORKER = "csr's DPO worker (its OpenRLHF strategy and DPOTrainer namespace)"
RM_WORKER = "csr's reward-model worker (its OpenRLHF strategy namespace)"


def uses_section(config_path: str, overrides: list[str], section: str) -> bool:
    """Whether the recipe configures ``section`` at all: a `section:` mapping or a `section.` override."""
    with open(config_path) as f:
        data = yaml.safe_load(f) or {}
    return section in data or any(o.split("=", 1)[0].strip().startswith(f"{section}.") for o in overrides)


def check(recipe: Recipe, config_path: str, overrides: list[str]) -> list[str]:
    """Check each trainer's flags with the entry point that will run them; returns what was checked.

    DPO runs in our worker (csr_plugin.training.dpo_main), which builds OpenRLHF's namespace itself: its
    flags, `dpo.openrlhf` included, are built and hierarchized as the worker does. PPO runs OpenRLHF's
    train_ppo_ray, whose own parser and assertions check them (that module imports vLLM); a recipe
    without a `ppo:` section is not checked for PPO, so a DPO-only recipe checks where vLLM is absent.
    `csr train-rm`'s ranks build their namespace as DPO's do, with `rm.openrlhf` applied: checked where
    the recipe has an `rm:` section.
    """
    from csr_plugin.openrlhf.cli_args import parse_openrlhf_args
    from csr_plugin.openrlhf.ppo import PPO_MODULE, ppo_dir, ppo_flags
    from csr_plugin.training.openrlhf_args import as_namespace

    as_namespace(dpo_flags(recipe.dpo, recipe.model.path, "pairs.jsonl", "dpo", gpu=True, logging=recipe.logging))
    checked = [DPO_WORKER]
    if uses_section(config_path, overrides, "rm"):
        from csr_plugin.reward_model.train_main import rm_flags

        as_namespace(rm_flags(recipe.rm, recipe.model.path, "pairs.jsonl", "rm", gpu=True))
        checked.append(RM_WORKER)
    if uses_section(config_path, overrides, "ppo"):
        parse_openrlhf_args(PPO_MODULE, to_argv(ppo_flags(recipe, ppo_dir(recipe) / "prompts.jsonl")))
        checked.append(PPO_MODULE)
    return checked


def named_flags() -> list[tuple[str, dict[str, list[str]]]]:
    """Per trainer: (title, {recipe key: the OpenRLHF flags it sets}), found from the flag builders."""
    import dataclasses

    from csr_plugin.config import Recipe
    from csr_plugin.openrlhf.ppo import _own_ppo_flags
    from csr_plugin.passthrough import controlled_flags
    from csr_plugin.reward_model.train_main import as_dpo_config
    from csr_plugin.training.openrlhf_args import _own_dpo_flags

    recipe = Recipe()
    tables = [
        ("`csr train-dpo` / `csr run` (csr's DPO worker)", {"dpo": recipe.dpo},
         lambda s: _own_dpo_flags(s["dpo"], "model", "pairs", "out", True, None)),
        ("`csr train-ppo` (OpenRLHF's train_ppo_ray)", {"ppo": recipe.ppo, "search": recipe.search,
                                                        "model": recipe.model},
         lambda s: _own_ppo_flags(dataclasses.replace(recipe, **s), "prompts.jsonl")),
        ("`csr train-rm` (csr's reward-model worker)", {"rm": recipe.rm},
         lambda s: _own_dpo_flags(as_dpo_config(s["rm"]), "model", "pairs", "out", True, None)),
    ]
    named = []
    for title, sections, build in tables:
        by_key: dict[str, list[str]] = {}
        for flag, keys in controlled_flags(build, sections).items():
            for key in keys.split(" and "):
                by_key.setdefault(key, []).append(flag)
        named.append((title, by_key))
    return named


def named_flags_markdown() -> str:
    """The recipe keys that set OpenRLHF flags (docs/openrlhf-flags.md holds this; `csr recipe flags`)."""
    lines = []
    for title, by_key in named_flags():
        lines += [f"{title}:", "", "| recipe key | OpenRLHF flag(s) |", "| --- | --- |"]
        lines += [f"| `{key}` | {', '.join(f'`--{f}`' for f in sorted(flags))} |" for key, flags in by_key.items()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
