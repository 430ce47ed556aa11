"""Calibrated reward: CLIP image relevance fused with the model's own score.

paper: R(s) = lambda * R_I(s) + (1 - lambda) * R_T(s)     (arXiv 2405.14622, eq. 5)
rank:  the official code fuses sibling *ranks* instead of raw scores:
       cost = (1 - a) * rank_LM + a * rank_CLIP, rank = (i + 1) / N with i = 0 the
       best of the N siblings. We report reward = 1 - cost so that, as with the
       paper form, higher is better.
"""
from __future__ import annotations

from typing import Sequence


def calibrated_reward(r_i: float, r_t: float, lambda_: float) -> float:
    return lambda_ * r_i + (1.0 - lambda_) * r_t


def _ranks(scores: Sequence[float]) -> list[float]:
    """(i + 1) / N where i is the position in descending order; ties keep input order."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    ranks = [0.0] * len(scores)
    for position, j in enumerate(order):
        ranks[j] = (position + 1) / len(scores)
    return ranks


def rank_fusion_reward(r_i: Sequence[float], r_t: Sequence[float], lambda_: float) -> list[float]:
    """Rewards of N siblings (candidates from the same parent) by the official rank fusion."""
    if len(r_i) != len(r_t):
        raise ValueError(f"rank fusion needs one R_I per R_T, got {len(r_i)} and {len(r_t)}.")
    if not r_i:
        return []
    rank_clip, rank_lm = _ranks(r_i), _ranks(r_t)
    return [1.0 - ((1.0 - lambda_) * lm + lambda_ * clip) for lm, clip in zip(rank_lm, rank_clip)]
