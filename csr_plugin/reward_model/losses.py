"""Bradley-Terry preference loss and pairwise accuracy of a reward model."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin) (OpenRLHF's PairWiseLoss).

    ``margin``: one number for all pairs or one per pair; None or 0 = plain Bradley-Terry.
    logsigmoid rather than log(sigmoid(.)): exact for large negative differences, where sigmoid underflows.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen rewards {tuple(chosen.shape)} and rejected rewards {tuple(rejected.shape)} "
                         "must have the same shape, one reward per pair")
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen reward is strictly higher: a tie counts as wrong, so a model that gives
    every response the same score is at 0, not at chance."""
    if chosen.numel() == 0:
        raise ValueError("no pairs to score")
    return (chosen > rejected).float().mean().item()
