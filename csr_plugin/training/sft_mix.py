"""Supervised examples mixed into DPO (`dpo.sft_data`): an NLL term on data the user trusts.

DPO on self-generated pairs moves the model only relative to its reference; on a small model
it also drifts what it says about objects the pairs never contrast (recall, yes/no answers).
A supervised micro-batch per DPO micro-batch keeps those answers in place: the loss becomes
``preference loss + dpo.sft_coef x mean NLL per answer token`` (the term OpenRLHF adds as
``--model.nll_loss_coef`` x nll, here computed on the SFT micro-batch instead of the chosen
responses; with ``dpo.nll_loss_coef`` set too, both are added, trainer.mixed_nll). docs/method.md says
when it helps and what it costs.

The file is JSON Lines, one example a line::

    {"images": ["img/1.png"], "prompt": [user message], "response": [assistant message]}

the messages as in the pairs format (relative image paths are read from the file's folder).
Which examples a micro-step gets depends only on the step, the rank and ``dpo.seed``, so a
resumed run sees the same examples it would have seen without the interruption.
"""
from __future__ import annotations

import os
import random

from csr_plugin.training.data import (MultimodalPreferenceDataset, PromptInputs, _check_image, _text_of, json_object,
                                      right_pad)


class SFTDataset(MultimodalPreferenceDataset):
    """SFT JSONL -> prompt ids (image expanded), answer ids, image tensors; read lazily like the pairs."""

    def __init__(self, path: str, processor, max_len: int):
        self.folder = os.path.dirname(os.path.abspath(path))
        super().__init__(path, processor, max_len)

    def _image_path(self, record: dict) -> str | None:
        images = record.get("images") or []
        return os.path.join(self.folder, images[0]) if images else None

    def _check(self, raw: bytes) -> None:
        record = json_object(raw)
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), list):
                raise ValueError(f"field {key!r} must be a list of messages")
        if not _text_of(record["response"]).strip():
            raise ValueError("the response is empty")
        image = self._image_path(record)
        if image:
            _check_image(image)

    def encode(self, record: dict) -> dict:
        from csr_plugin.multimodal import encode_prompt
        from csr_plugin.sampling.prompts import load_image

        prompt_text = self._prompt_text(record)
        image = self._image_path(record)
        if image:
            prompt_ids, image_inputs = encode_prompt(self.processor, prompt_text, load_image(image))
        else:
            prompt_ids, image_inputs = self.tokenizer(prompt_text)["input_ids"], {}
        budget = self.max_len - len(prompt_ids)
        if budget < 2:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens, over dpo.max_len={self.max_len}")
        return {"prompt_ids": prompt_ids, "response_ids": self._response_ids(record, "response", prompt_text)[:budget],
                "image_inputs": image_inputs}

    def collate_fn(self, items: list[dict]):
        """(ids, attention mask, PromptInputs): right-padded prompt + answer rows."""
        from csr_plugin.multimodal import concat_image_inputs

        ids, mask = right_pad([it["prompt_ids"] + it["response_ids"] for it in items], self.pad_id)
        return ids, mask, PromptInputs([len(it["prompt_ids"]) for it in items],
                                       concat_image_inputs([it["image_inputs"] for it in items]))


class SFTStream:
    """The SFT micro-batch of each DPO micro-step: rank r at step k takes a fixed slice of a seeded order."""

    def __init__(self, dataset: SFTDataset, micro_batch: int, rank: int, world_size: int, seed: int):
        self.dataset, self.micro_batch, self.rank, self.world_size = dataset, micro_batch, rank, world_size
        self.order = list(range(len(dataset)))
        random.Random(seed).shuffle(self.order)
        self.step = 0

    def indices(self, step: int) -> list[int]:
        start = (step * self.world_size + self.rank) * self.micro_batch
        return [self.order[(start + j) % len(self.order)] for j in range(self.micro_batch)]

    def next_batch(self):
        batch = self.dataset.collate_fn([self.dataset[i] for i in self.indices(self.step)])
        self.step += 1
        return batch
