"""Start `csr train-rm`: torchrun starts ``rm.nproc`` ranks here (GPUs with NCCL, CPU ranks with gloo), or,
inside a launch already (RANK and WORLD_SIZE set), this process trains as one rank.

torchrun's ``--standalone`` picks a free rendezvous port itself, so two runs on one machine never collide.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from csr_plugin.config import Recipe
from csr_plugin.training.launch import inside_distributed_launch, launch_ranks, rank_command


def worker_command(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str,
                   out_dir: str) -> list[str]:
    worker = ["--config", config_path, "--model", model, "--pairs", pairs, "--out", out_dir, *overrides]
    return rank_command("csr_plugin.reward_model.train_main", recipe.rm.nproc, worker)


def run_rm(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str, out_dir: str,
           log_file: Optional[str | Path] = None) -> int:
    """Train, in this process if it is already a rank, else by launching the ranks; returns the exit code.
    ``log_file``: the launcher's and the ranks' output go there (quiet mode), its end printed on failure."""
    if inside_distributed_launch():
        from csr_plugin.reward_model.train_main import train_rm

        train_rm(recipe, model, pairs, out_dir)
        return 0
    return launch_ranks(worker_command(recipe, config_path, overrides, model, pairs, out_dir), recipe.rm.nproc,
                        log_file, "reward model training")
