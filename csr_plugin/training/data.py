"""Multimodal preference pairs for DPO: what OpenRLHF's text-only RewardDataset cannot hold.

Each pair is tokenised through the model's processor, so the image placeholder
expands to the model's image tokens and the pixel inputs come with it. Chosen and
rejected share the prompt and the image: the pixels are stored once per pair.

Batches keep the 5-tuple OpenRLHF's DPOTrainer unpacks
(chosen_ids, chosen_mask, rejected_ids, rejected_mask, prompt_lengths); the pixel
inputs ride on ``prompt_lengths`` (a list with an ``image_inputs`` attribute), so the
trainer loop itself is OpenRLHF's, unmodified.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.utils.data import Dataset

from csr_plugin.jsonl import read_jsonl
from csr_plugin.multimodal import LLAVA_PROMPT, concat_image_inputs

log = logging.getLogger(__name__)

class PromptLengths(list):
    """Prompt token counts of a batch, carrying the batch's image inputs for the trainer."""

    image_inputs: dict


def _text_of(messages: list[dict]) -> str:
    parts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return "".join(parts)


class MultimodalPreferenceDataset(Dataset):
    """Pairs JSONL (conversational preference format with ``images``) -> token ids + pixel inputs."""

    def __init__(self, path: str, processor, max_len: int):
        from csr_plugin.sampling import PromptError, load_image

        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_len = max_len
        self.items, self.skipped = [], []
        for number, record, problem in read_jsonl(path):
            try:
                if record is None:
                    raise ValueError(problem)
                image_paths = record.get("images") or []
                image = load_image(image_paths[0]) if image_paths else None
                self.items.append(self._encode(record, image))
            except (PromptError, ValueError, KeyError, TypeError, IndexError) as exc:
                self.skipped.append(f"line {number}: {exc}")
        if self.skipped:
            log.warning("%d of %d pairs skipped, first: %s", len(self.skipped),
                        len(self.items) + len(self.skipped), self.skipped[0])
        if not self.items:
            raise ValueError(f"no usable pairs in {path}: {self.skipped[:3]}")

    def _prompt_and_suffixes(self, record: dict) -> tuple[str, list[str]]:
        """The prompt text and each response's text as the chat template writes it after the prompt."""
        has_image = bool(record.get("images"))
        if getattr(self.processor, "chat_template", None):
            prompt = self.processor.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
            suffixes = []
            for key in ("chosen", "rejected"):
                full = self.processor.apply_chat_template(record["prompt"] + record[key], tokenize=False)
                if not full.startswith(prompt):
                    raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
                suffixes.append(full[len(prompt):])
            return prompt, suffixes
        image_token = getattr(self.processor, "image_token", "<image>") if has_image else ""
        prompt = LLAVA_PROMPT.format(image=image_token, question=_text_of(record["prompt"]))
        return prompt, [" " + _text_of(record[k]) + self.tokenizer.eos_token for k in ("chosen", "rejected")]

    def _encode(self, record: dict, image) -> dict:
        prompt, (chosen, rejected) = self._prompt_and_suffixes(record)
        if image is not None:
            inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        else:
            inputs = self.tokenizer(prompt, return_tensors="pt")
        prompt_ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        budget = self.max_len - len(prompt_ids)
        if budget < 2:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens, over dpo.max_len={self.max_len}")
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"][:budget]  # noqa: E731
        chosen_ids, rejected_ids = encode(chosen), encode(rejected)
        if chosen_ids == rejected_ids:
            raise ValueError("chosen and rejected are identical after tokenisation")
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
                "image_inputs": dict(inputs)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def collate_fn(self, items: list[dict]):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def right_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, seq in enumerate(seqs):
                ids[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = 1
            return ids, mask

        chosen_ids, chosen_mask = right_pad([it["prompt_ids"] + it["chosen_ids"] for it in items])
        rejected_ids, rejected_mask = right_pad([it["prompt_ids"] + it["rejected_ids"] for it in items])
        lengths = PromptLengths(len(it["prompt_ids"]) for it in items)
        lengths.image_inputs = concat_image_inputs([it["image_inputs"] for it in items])
        return chosen_ids, chosen_mask, rejected_ids, rejected_mask, lengths


def load_processor(path: str, trust_remote_code: bool = False, padding_side: Optional[str] = "right"):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if padding_side:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor
