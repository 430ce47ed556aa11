"""The recipe of a process OpenRLHF starts for us (vLLM engines, Ray workers).

OpenRLHF builds our hooks with no arguments (``reward_func``, ``AgentExecutor()``),
so the recipe travels in the environment, which Ray passes to its workers through
``runtime_env`` ``env_vars``: ``CSR_RECIPE=/path/recipe.yaml`` and optionally
``CSR_RECIPE_OVERRIDES='["reward.lambda=0.5", "clip.device=cuda"]'``, a JSON list of
``key=value`` strings (``encode_overrides``), so a value may hold spaces.

A relative ``CSR_RECIPE`` resolves against the worker's working directory: `csr train-ppo`
ships the recipe in the Ray ``working_dir`` (ppo.py), where Ray starts every worker.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from csr_plugin.config import Recipe, load_recipe

RECIPE_VAR = "CSR_RECIPE"
OVERRIDES_VAR = "CSR_RECIPE_OVERRIDES"


def encode_overrides(overrides: list[str]) -> str:
    """Overrides for ``CSR_RECIPE_OVERRIDES``: a JSON list, so ``data.prompts=/a b/p.jsonl`` stays one item."""
    return json.dumps([str(o) for o in overrides])


def decode_overrides(text: str) -> list[str]:
    """``CSR_RECIPE_OVERRIDES`` back to a list: a JSON list, or the older whitespace-separated form.

    The older form is still read because it cannot be confused with a list: an override starts with
    its key, never with ``[``. It cannot hold a value with spaces.
    """
    text = text.strip()
    if not text:
        return []
    if not text.startswith("["):
        return text.split()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{OVERRIDES_VAR}={text!r} is not valid JSON ({exc}); set it to a JSON list of "
                         'key=value strings, e.g. \'["reward.lambda=0.5", "data.prompts=/a b/p.jsonl"]\'.') from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{OVERRIDES_VAR}={text!r} must be a JSON list of key=value strings, "
                         'e.g. \'["reward.lambda=0.5"]\'.')
    return value


def recipe_from_env() -> Recipe:
    path = os.environ.get(RECIPE_VAR)
    if not path:
        raise RuntimeError(f"{RECIPE_VAR} is not set: export {RECIPE_VAR}=/path/to/recipe.yaml where OpenRLHF's "
                           "vLLM engines run (Ray runtime_env env_vars; `csr train-ppo` sets it).")
    if not Path(path).is_file():
        # On a cluster this is the usual failure: a head-node path, or a worker not started in the working_dir.
        raise RuntimeError(f"{RECIPE_VAR}={path!r} is not a file on node {socket.gethostname()} (working directory "
                           f"{os.getcwd()}). Ship the recipe with the Ray runtime_env working_dir, as `csr train-ppo` "
                           "does, or put it on storage every node mounts at the same path.")
    return load_recipe(path, decode_overrides(os.environ.get(OVERRIDES_VAR, "")))
