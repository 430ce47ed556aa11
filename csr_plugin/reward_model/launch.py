"""Start `csr train-rm` on this machine or a cluster, or run in the launch we are already inside, as
`csr train-dpo` does (training/launch.py's rank_command):

- inside torchrun / deepspeed / srun (RANK and WORLD_SIZE set): this process is one rank;
- ``rm.hostfile`` set: the deepspeed launcher spreads ranks over the listed nodes;
- otherwise: torchrun starts ``rm.nproc`` ranks here (GPUs with NCCL, CPU ranks with gloo).

The rendezvous port is free unless ``rm.master_port`` names one (torchrun's ``--standalone``, or a port
picked here for the deepspeed launcher), so two runs on one machine never collide.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from csr_plugin.config import Recipe
from csr_plugin.training.launch import inside_distributed_launch, launch_ranks, rank_command


def worker_command(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str,
                   out_dir: str) -> list[str]:
    cfg = recipe.rm
    worker = ["--config", config_path, "--model", model, "--pairs", pairs, "--out", out_dir, *overrides]
    return rank_command("csr_plugin.reward_model.train_main", cfg.nproc, worker, cfg.master_port, cfg.hostfile)


def run_rm(recipe: Recipe, config_path: str, overrides: list[str], model: str, pairs: str, out_dir: str,
           log_file: Optional[str | Path] = None) -> int:
    """Train, in this process if it is already a rank, else by launching the ranks; returns the exit code.
    ``log_file``: the launcher's and the ranks' output go there (quiet mode), its end printed on failure."""
    from csr_plugin.reward_model.train_main import rm_flags, train_rm

    rm_flags(recipe.rm, model, pairs, out_dir)   # a refused `rm.openrlhf` flag fails here, before any rank starts
    if inside_distributed_launch():
        train_rm(recipe, model, pairs, out_dir)
        return 0
    return launch_ranks(worker_command(recipe, config_path, overrides, model, pairs, out_dir), recipe.rm.nproc,
                        log_file, "reward model training")
