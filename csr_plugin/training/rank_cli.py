"""The command line of one training rank, as `launch.rank_command` starts it (DPO and reward model alike).

Kept apart from launch.py: the launcher imports the rank modules to train in-process when it is
already a rank, and a rank module importing the launcher back would make the two a loop.
"""
from __future__ import annotations

import argparse
import os


def rank_arguments(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of one rank (what ``rank_command`` passes it), for dpo_main and train_main alike."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", help="model to train (default: model.path)")
    parser.add_argument("--pairs", help="pairs JSONL (default: the recipe's pairs key)")
    parser.add_argument("--out", help="output folder (default: output_dir)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.local_rank != -1:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args
