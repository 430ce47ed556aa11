"""The PPO step reward: each sentence's calibrated reward less the mean sentence reward of its prompt group.

For rollout i of a prompt group g (OpenRLHF's ``n_samples_per_prompt`` rollouts of one
prompt) with sentences k = 1..m_i and calibrated rewards r_ik = lambda R_I + (1 - lambda) R_T:

    b_g      = sum_{i in g} sum_k r_ik / sum_{i in g} m_i        (mean sentence reward of the group)
    step_ik  = r_ik - b_g                                         (placed at sentence k's last token)
    R_i      = sum_k step_ik = S_i - m_i b_g                      (the scalar OpenRLHF shapes)

An average sentence earns 0, a below-average one (typically hallucinated: low CLIP relevance)
loses, and adding average sentences leaves R_i unchanged; the group's totals sum to 0, so
OpenRLHF's group mean is 0 too and its residual at the last token stays small (docs/ppo.md,
"The step reward"). The centring needs the whole group, which only the trainer's
``compute_advantages_and_returns`` sees: dense_rewards.py applies it there.

``check_step_reward(recipe)`` refuses the settings under which this would not hold.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from csr_plugin.config import ConfigError, Recipe

if TYPE_CHECKING:  # dense_rewards.py imports this module in every Ray worker: torch only when used
    import torch

CORRECTION_FLAG = "algo.advantage.is_correction_level"


def check_step_reward(recipe: Recipe) -> None:
    """Raise ConfigError when the recipe's PPO reward would not mean what docs/ppo.md says."""
    from csr_plugin.passthrough import flatten

    ppo, search = recipe.ppo, recipe.search
    if ppo.dense_rewards and ppo.n_samples_per_prompt < 2:
        raise ConfigError(
            "`ppo.dense_rewards: true` centres each sentence reward on the mean over the prompt's rollouts; with "
            "`ppo.n_samples_per_prompt: 1` that mean is the rollout's own and every return is 0: set "
            "n_samples_per_prompt >= 2.")
    if not ppo.dense_rewards and not recipe.curation.length_normalize:
        raise ConfigError(
            "`ppo.dense_rewards: false` with `curation.length_normalize: false` rewards the raw sum of sentence "
            "rewards, which grows with every sentence added (R_I is never negative): set "
            "`curation.length_normalize: true` (the mean) or `ppo.dense_rewards: true` (the centred step reward).")
    if recipe.reward.fusion == "rank" and search.candidates == 1:
        raise ConfigError(
            "`reward.fusion: rank` ranks sibling candidates; with `search.candidates: 1` every sentence ranks "
            "first and earns 0: set `reward.fusion: paper`.")
    correction = flatten(ppo.openrlhf, "ppo.openrlhf").get(CORRECTION_FLAG, "off")
    if correction not in ("off", None) and (search.temperature != 1.0 or search.top_p != 1.0):
        # OpenRLHF builds its vLLM engines with logprobs_mode="processed_logprobs" whenever the
        # correction is on (cli/train_ppo_ray.py): log-probs after temperature and top-p, which
        # the rollouts' R_T would then silently be. At temperature 1 without top-p they are raw.
        raise ConfigError(
            f"`ppo.openrlhf.{CORRECTION_FLAG}: {correction}` makes OpenRLHF's vLLM report processed log-probs "
            f"(after temperature {search.temperature} and top_p {search.top_p}), and R_T is defined on the "
            "policy's raw log-probs: set `search.temperature: 1.0` and `search.top_p: 1.0`, or drop the "
            "correction.")


def group_baselines(sums: torch.Tensor, counts: torch.Tensor, group_size: int) -> torch.Tensor:
    """b_g for every sample, in rollout order: the mean sentence reward of its prompt group (0 without sentences).

    ``sums`` and ``counts`` are per sample (N,), N a multiple of ``group_size``, grouped as
    OpenRLHF groups them (consecutive samples of the rollout order share a prompt).
    """
    import torch

    if sums.numel() % group_size:
        raise RuntimeError(f"csr step reward: {sums.numel()} samples do not split into prompt groups of "
                           f"{group_size}.")
    group_sums = sums.reshape(-1, group_size).sum(-1)
    group_counts = counts.reshape(-1, group_size).sum(-1)
    baselines = torch.where(group_counts > 0, group_sums / group_counts.clamp(min=1), torch.zeros_like(group_sums))
    return baselines.repeat_interleave(group_size)
