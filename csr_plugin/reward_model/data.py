"""Pairs for the reward model: the held-out split, (pair, cut) items and their batches.

Built on csr_plugin.training.data.MultimodalPreferenceDataset (token-exact prompt + response ids and
image tensors, read lazily per batch); a batch is one forward over 2B rows, the B chosen sequences
then the B rejected ones, right-padded, with the family's per-token inputs (multimodal.batch_inputs).
"""
from __future__ import annotations

import hashlib
import logging
import torch
from torch.utils.data import Dataset

from csr_plugin.multimodal import batch_inputs
from csr_plugin.reward_model.partial import cut, epoch_items

log = logging.getLogger(__name__)


def _id_hash(pair_id: str) -> str:
    return hashlib.sha256(pair_id.encode("utf-8")).hexdigest()


def pair_ids(base) -> list[str]:
    """Each usable pair's ``id`` field; a pair without one is named by its line number in the file."""
    ids = []
    for index, line in enumerate(base.line_numbers):
        value = base.record(index).get("id")
        ids.append(str(value) if value is not None else f"line:{line}")
    return ids


def split_by_id(ids: list[str], eval_fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), decided by the pair ids only: the same on every rank and rerun,
    whatever the file order. The distinct ids are ordered by their SHA-256 and the first
    round(eval_fraction x #ids) are held out (at least one when eval_fraction > 0), with every pair of
    those ids: pairs of one prompt never sit on both sides."""
    distinct = sorted(set(ids), key=_id_hash)
    held = 0 if eval_fraction <= 0 else max(1, round(eval_fraction * len(distinct)))
    if held >= len(distinct):
        raise ValueError(f"{len(distinct)} distinct pair ids cannot be split with rm.eval_fraction={eval_fraction}: "
                         "nothing would be left to train on; add pairs or lower rm.eval_fraction.")
    held_out = set(distinct[:held])
    train = [i for i, pid in enumerate(ids) if pid not in held_out]
    evaluation = [i for i, pid in enumerate(ids) if pid in held_out]
    return train, evaluation


class RewardPairs(Dataset):
    """(pair, cut) items of some pairs of ``base``; ``partial=False``: each pair whole, once."""

    def __init__(self, base, indices: list[int], model_config, batch: int = 1, partial: bool = False):
        self.base, self.indices, self.config = base, list(indices), model_config
        tokenizer = base.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        responses = []
        for i in (self.indices if partial else []):
            try:
                chosen, rejected = base.response_ids(i)   # no image decoding: cut lengths only
                responses.append((chosen, rejected) if chosen != rejected else None)
            except ValueError as exc:   # trained whole; if it fails then too, base swaps it for the next pair
                log.warning("pair on line %d: %s; trained on its full responses only", base.line_numbers[i], exc)
                responses.append(None)
        if not partial:
            responses = [None] * len(self.indices)
        self.items = epoch_items(responses, batch, partial)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        position, length = self.items[index]
        item = self.base[self.indices[position]]
        chosen, rejected = cut(item["chosen_ids"], item["rejected_ids"], length)
        return {"prompt_ids": item["prompt_ids"], "chosen_ids": chosen, "rejected_ids": rejected,
                "image_inputs": item["image_inputs"], "cut": length}

    def collate_fn(self, items: list[dict]) -> dict:
        rows = [it["prompt_ids"] + it["chosen_ids"] for it in items] + \
               [it["prompt_ids"] + it["rejected_ids"] for it in items]
        images = [it["image_inputs"] for it in items] * 2
        return batch_inputs(self.config, rows, images, self.pad_id, padding_side="right")


def split_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2B rewards of a collated batch -> (chosen [B], rejected [B])."""
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


