"""Start `csr train-dpo` on this machine or a cluster, or run in the launch we are already inside.

- inside torchrun / deepspeed / srun (RANK and WORLD_SIZE set): this process is one rank;
- ``dpo.hostfile`` set: the deepspeed launcher spreads ranks over the listed nodes;
- otherwise: torchrun starts ``dpo.nproc`` ranks here (GPUs with NCCL, CPU ranks with gloo).

The rendezvous port is free unless ``dpo.master_port`` names one: torchrun's ``--standalone``
picks a free port itself; for the deepspeed launcher we pick one here. A fixed default port
made two runs on one machine fail with EADDRINUSE.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from csr_plugin.config import ConfigError, Recipe
from csr_plugin.run_logs import run_logged
from csr_plugin.training.tracking import check_wandb_login


def inside_distributed_launch() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it; another process may take it later,
    which the launcher then reports as a rendezvous error)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def preflight(recipe: Recipe, loop: bool = False) -> None:
    """What would fail only once DPO starts, checked before anything runs (`csr run` samples for hours first)."""
    check_wandb_login(recipe.logging)
    if recipe.dpo.sft_data and not Path(recipe.dpo.sft_data).is_file():
        raise ConfigError(f"`dpo.sft_data`: no file at {recipe.dpo.sft_data}; give the SFT examples JSONL "
                          f"(training/sft_mix.py shows the format) or remove the key to train without them.")
    if loop and recipe.loop.holdout and recipe.reward.fusion != "paper":
        raise ConfigError("`loop.holdout` scores answers with the calibrated reward of one response at a time, which "
                          "needs `reward.fusion: paper` (rank fusion ranks siblings); set it, or loop.holdout: ''.")
    if loop and not recipe.dpo.lora_merge:
        raise ConfigError("`dpo.lora_merge: false` leaves each iterate as a LoRA adapter, but `csr run` samples "
                          "with it and trains the next iteration from it as a whole model: set "
                          "`dpo.lora_merge: true`, or train once with `csr train-dpo`.")


def installed_attention(recipe: Recipe, overrides: list[str]) -> tuple[Recipe, list[str]]:
    """dpo.attn_implementation as the installed flash-attn allows: without its CUDA kernels a flash-attn
    implementation becomes sdpa (a warning says so; accelerator.py), for this process and, as an override,
    for the ranks it starts, which run the same install."""
    import dataclasses

    from csr_plugin.accelerator import attention

    chosen = attention(recipe.dpo.attn_implementation, "dpo.attn_implementation")
    if chosen == recipe.dpo.attn_implementation:
        return recipe, overrides
    return (dataclasses.replace(recipe, dpo=dataclasses.replace(recipe.dpo, attn_implementation=chosen)),
            [*overrides, f"dpo.attn_implementation={chosen}"])


def deepspeed_launcher() -> str:
    """DeepSpeed's launcher script of this interpreter's environment: `csr` run as .venv/bin/csr, without
    the venv on PATH, would not find a bare `deepspeed`."""
    beside = Path(sys.executable).parent / "deepspeed"
    return str(beside) if beside.exists() else "deepspeed"


def rank_command(module: str, nproc: int, worker: list[str], master_port: int | None = None,
                 hostfile: str | None = None) -> list[str]:
    """The command that starts ``python -m module`` as ``nproc`` ranks (or as the hostfile's ranks)."""
    if hostfile:
        # The master is the hostfile's first node; the port must be free there. When this machine is
        # not that node, set the master port to a port known to be open on it.
        port = master_port or free_port()
        return [deepspeed_launcher(), "--hostfile", hostfile, "--master_port", str(port), "--module", module, *worker]
    rendezvous = [f"--master_port={master_port}"] if master_port else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous,
            "-m", module, *worker]


def worker_command(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str,
                   out_dir: str) -> list[str]:
    cfg = recipe.dpo
    worker = ["--config", config_path, "--model", model, "--pairs", pairs, "--out", out_dir, *overrides]
    return rank_command("csr_plugin.training.dpo_main", cfg.nproc, worker, cfg.master_port, cfg.hostfile)


def launch_ranks(command: list[str], nproc: int, log_file: str | Path | None, what: str) -> int:
    """Run the launcher; its and every rank's output go to ``log_file`` when given (quiet mode)."""
    env = dict(os.environ)
    # ranks share the cores: without this each would start a thread per core and they would contend
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if log_file is not None:
        return run_logged(command, log_file, env, what=what)
    return subprocess.run(command, env=env).returncode


def run_dpo(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str, out_dir: str,
            log_file: str | Path | None = None) -> int:
    """Train, in this process if it is already a rank, else by launching the ranks; returns the exit code.

    ``log_file``: the launcher's and every rank's stdout and stderr are appended there instead of the
    terminal (quiet mode); if DPO fails its last lines and path are printed.
    """
    preflight(recipe)
    recipe, overrides = installed_attention(recipe, overrides)
    if inside_distributed_launch():
        from csr_plugin.training.dpo_main import train_dpo

        train_dpo(recipe, model, pairs, out_dir)
        return 0
    return launch_ranks(worker_command(recipe, config_path, overrides, model, pairs, out_dir), recipe.dpo.nproc,
                        log_file, "DPO")
