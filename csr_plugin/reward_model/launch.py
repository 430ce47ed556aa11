"""Start `csr train-rm`: torchrun starts ``rm.nproc`` ranks here (GPUs with NCCL, CPU ranks with gloo), or,
inside a launch already (RANK and WORLD_SIZE set), this process trains as one rank.

torchrun's ``--standalone`` picks a free rendezvous port itself, so two runs on one machine never collide.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from csr_plugin.config import Recipe
from csr_plugin.run_logs import run_logged
from csr_plugin.training.launch import inside_distributed_launch


def worker_command(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str,
                   out_dir: str) -> list[str]:
    worker = ["--config", config_path, "--model", model, "--pairs", pairs, "--out", out_dir, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={recipe.rm.nproc}", "--standalone",
            "-m", "csr_plugin.reward_model.train_main", *worker]


def run_rm(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str, out_dir: str,
           log_file: Optional[str | Path] = None) -> int:
    """Train, in this process if it is already a rank, else by launching the ranks; returns the exit code.
    ``log_file``: the launcher's and the ranks' output go there (quiet mode), its end printed on failure."""
    if inside_distributed_launch():
        from csr_plugin.reward_model.train_main import train_rm

        train_rm(recipe, model, pairs, out_dir)
        return 0
    env = dict(os.environ)
    # ranks share the cores: without this each would start a thread per core and they would contend
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // recipe.rm.nproc)))
    command = worker_command(recipe, config_path, overrides, model, pairs, out_dir)
    if log_file is not None:
        return run_logged(command, log_file, env, what="reward model training")
    return subprocess.run(command, env=env).returncode
