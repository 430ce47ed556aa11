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
    if loop and not recipe.dpo.lora_merge:
        raise ConfigError("`dpo.lora_merge: false` leaves each iterate as a LoRA adapter, but `csr run` samples "
                          "with it and trains the next iteration from it as a whole model: set "
                          "`dpo.lora_merge: true`, or train once with `csr train-dpo`.")


def worker_command(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str,
                   out_dir: str) -> list[str]:
    cfg = recipe.dpo
    worker = ["--config", config_path, "--model", model, "--pairs", pairs, "--out", out_dir, *overrides]
    if cfg.hostfile:
        # The master is the hostfile's first node; the port must be free there. When this machine is
        # not that node, set dpo.master_port to a port known to be open on it.
        port = cfg.master_port or free_port()
        return ["deepspeed", "--hostfile", cfg.hostfile, "--master_port", str(port),
                "--module", "csr_plugin.training.dpo_main", *worker]
    rendezvous = [f"--master_port={cfg.master_port}"] if cfg.master_port else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc}", *rendezvous,
            "-m", "csr_plugin.training.dpo_main", *worker]


def run_dpo(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str, out_dir: str,
            log_file: str | Path | None = None) -> int:
    """Train, in this process if it is already a rank, else by launching the ranks; returns the exit code.

    ``log_file``: the launcher's and every rank's stdout and stderr are appended there instead of the
    terminal (quiet mode); if DPO fails its last lines and path are printed.
    """
    preflight(recipe)
    if inside_distributed_launch():
        from csr_plugin.training.dpo_main import train_dpo

        train_dpo(recipe, model, pairs, out_dir)
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // recipe.dpo.nproc)))
    command = worker_command(recipe, config_path, overrides, model, pairs, out_dir)
    if log_file is not None:
        return run_logged(command, log_file, env, what="DPO")
    return subprocess.run(command, env=env).returncode
