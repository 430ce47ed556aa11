"""The recipe of a process OpenRLHF starts for us (vLLM engines, Ray workers).

OpenRLHF builds our hooks with no arguments (``reward_func``, ``AgentExecutor()``),
so the recipe travels in the environment, which Ray passes to its workers through
``runtime_env`` ``env_vars``: ``CSR_RECIPE=/path/recipe.yaml`` and optionally
``CSR_RECIPE_OVERRIDES="reward.lambda=0.5 clip.device=cuda"``.
"""
from __future__ import annotations

import os

from csr_plugin.config import Recipe, load_recipe


def recipe_from_env() -> Recipe:
    path = os.environ.get("CSR_RECIPE")
    if not path:
        raise RuntimeError("CSR_RECIPE is not set: export CSR_RECIPE=/path/to/recipe.yaml where OpenRLHF's "
                           "vLLM engines run (Ray runtime_env env_vars).")
    return load_recipe(path, os.environ.get("CSR_RECIPE_OVERRIDES", "").split())
