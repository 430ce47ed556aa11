"""Start `csr train-dpo` on this machine or a cluster, or run in the launch we are already inside.

- inside torchrun / deepspeed / srun (RANK and WORLD_SIZE set): this process is one rank;
- ``dpo.hostfile`` set: the deepspeed launcher spreads ranks over the listed nodes;
- otherwise: torchrun starts ``dpo.nproc`` ranks here (GPUs with NCCL, CPU ranks with gloo).
"""
from __future__ import annotations

import os
import subprocess
import sys

from csr_plugin.config import Recipe


def inside_distributed_launch() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def worker_command(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str,
                   out_dir: str) -> list[str]:
    cfg = recipe.dpo
    worker = ["--config", config_path, "--model", model, "--pairs", pairs, "--out", out_dir, *overrides]
    if cfg.hostfile:
        return ["deepspeed", "--hostfile", cfg.hostfile, "--master_port", str(cfg.master_port),
                "--module", "csr_plugin.training.dpo_main", *worker]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc}",
            f"--master_port={cfg.master_port}", "-m", "csr_plugin.training.dpo_main", *worker]


def run_dpo(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str, out_dir: str) -> int:
    """Train, in this process if it is already a rank, else by launching the ranks; returns the exit code."""
    if inside_distributed_launch():
        from csr_plugin.training.dpo_main import train_dpo

        train_dpo(recipe, model, pairs, out_dir)
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // recipe.dpo.nproc)))
    return subprocess.run(worker_command(recipe, config_path, overrides, model, pairs, out_dir), env=env).returncode
