"""OpenRLHF reward hook: pass this file as ``--reward.remote_url /path/to/csr_plugin/openrlhf/reward_func.py``.

OpenRLHF 0.11 (``SingleTurnAgentExecutor`` in openrlhf/utils/agent.py) loads it
with ``importlib.util.spec_from_file_location("reward_func", path)`` in every
vLLM engine process and calls ``reward_func(queries, prompts, labels)`` through
``asyncio.to_thread``: one response per call, many calls at once. It reads
``rewards`` (advantages), ``scores`` (dynamic filtering; CSR rewards are not in
[0, 1], so filter bounds must be set for them) and ``extra_logs`` (one value per
sample, logged).

Images never reach a reward function: each label carries its image as
``{"image": "<path>"}`` or a plain path (``--data.label_key``). The recipe comes
from the environment, which must reach the engines (Ray ``runtime_env``
``env_vars``): ``CSR_RECIPE=/path/recipe.yaml`` and optionally
``CSR_RECIPE_OVERRIDES="reward.lambda=0.5 clip.device=cuda"``. Each engine
process loads its own scoring VLM and visual term (CLIP, or ``reward.mrm`` with
``reward.source: mrm``); reward_server.py shares one copy.
"""
from __future__ import annotations

import threading

from csr_plugin.openrlhf.env_recipe import recipe_from_env
from csr_plugin.openrlhf.response_reward import ResponseRewardScorer, openrlhf_items
from csr_plugin.openrlhf.reward_server import BatchingScorer

_batcher: BatchingScorer | None = None
_lock = threading.Lock()


def _shared_batcher() -> BatchingScorer:
    """The process's scorer, loaded on first use; concurrent calls share its batches."""
    global _batcher
    with _lock:
        if _batcher is None:
            _batcher = BatchingScorer(ResponseRewardScorer.from_recipe(recipe_from_env()))
    return _batcher


def reward_func(queries, prompts, labels) -> dict:
    """CSR's calibrated reward of each ``query`` (prompt + response) against the image in its label."""
    import torch

    batcher = _shared_batcher()
    items = openrlhf_items(list(queries), list(prompts), list(labels), batcher.scorer.image_token)
    scored = batcher.score(items)
    rewards = torch.tensor([s.reward for s in scored], dtype=torch.float32)
    return {"rewards": rewards, "scores": rewards,
            "extra_logs": {"r_i": torch.tensor([s.r_i for s in scored], dtype=torch.float32),
                           "r_t": torch.tensor([s.r_t for s in scored], dtype=torch.float32)}}
