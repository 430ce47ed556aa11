"""Multimodal preference pairs for DPO: what OpenRLHF's text-only RewardDataset cannot hold.

Token-exact: a pair that carries the sampled ids (``chosen_token_ids``, written by
``csr curate``) is trained on exactly those ids after the prompt the processor builds
with the image, the sequence the policy generated and the search scored. A pair with
text only is tokenized with its prompt in one piece, never apart: a SentencePiece
tokenizer gives "▁There" at a word start but "There" after ':' (docs/data-contracts.md).

Lazy: the file is indexed once (byte offset of each usable line); a line is read and
its image decoded and processed when a batch asks for it, so a rank's memory does not
grow with the number of pairs.

Batches keep the 5-tuple OpenRLHF's DPOTrainer unpacks
(chosen_ids, chosen_mask, rejected_ids, rejected_mask, prompts), so the trainer loop
itself is OpenRLHF's, unmodified. Its fifth item, text-only prompt lengths in OpenRLHF,
is a :class:`PromptInputs` here: the lengths and the image tensors as two fields (the loop
only hands it to our trainer's forward). Per-token inputs (Qwen's ``mm_token_type_ids``,
Gemma3's ``token_type_ids``) are not carried: OpenRLHF's ``Actor.forward`` rebuilds them
for the full padded sequences from the image token ids.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import Dataset

from csr_plugin.multimodal import LLAVA_PROMPT, concat_image_inputs, encode_prompt

log = logging.getLogger(__name__)

# Why a search ended a response without the model choosing to: trained without EOS. "cut": curation's
# cut after a sentence with curation.stop_with_eos false.
LIMIT_FINISHES = ("max_sentences", "context", "length", "cut")


@dataclass(eq=False)   # compared by identity: the trainer matches a reference result to its batch
class PromptInputs:
    """What a micro-batch's prompts add to its token ids: each row's prompt length (masked out of the
    log-probs) and the image tensors of the rows, stacked along dim 0 (tiles padded across rows)."""

    lengths: list[int]
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _text_of(messages: list[dict]) -> str:
    parts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return "".join(parts)


def json_object(raw: bytes) -> dict:
    """One JSONL line as a dict, or a ValueError saying what is wrong with it."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a valid JSON line ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token sequences padded on the right to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return ids, mask


def _check_image(path: str) -> None:
    """Cheap start-up check (the file exists and is an image); decoding waits for the batch."""
    from PIL import Image, UnidentifiedImageError

    from csr_plugin.sampling.prompts import PromptError

    try:
        with Image.open(path):
            pass
    except FileNotFoundError:
        raise PromptError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PromptError(f"image unreadable or corrupt: {path} ({type(exc).__name__}: {exc})") from None


class MultimodalPreferenceDataset(Dataset):
    """Pairs JSONL (conversational preference format with ``images``) -> token ids + pixel inputs, per batch."""

    def __init__(self, path: str, processor, max_len: int):
        self.path = str(path)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_len = max_len
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.end_ids = self._end_of_response_ids()
        self.offsets: list[int] = []
        self.line_numbers: list[int] = []
        self.skipped: list[str] = []
        self._late_skips: set[int] = set()
        with open(self.path, "rb") as f:
            number, offset = 0, 0
            for raw in f:
                number += 1
                try:
                    self._check(raw)
                    self.offsets.append(offset)
                    self.line_numbers.append(number)
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    if raw.strip():
                        self.skipped.append(f"line {number}: {exc}")
                offset += len(raw)
        if self.skipped:
            log.warning("%d of %d pairs skipped, first: %s", len(self.skipped),
                        len(self.offsets) + len(self.skipped), self.skipped[0])
        if not self.offsets:
            raise ValueError(f"no usable pairs in {path}: {self.skipped[:3]}")

    # ------------------------------------------------------------ start-up
    def _end_of_response_ids(self) -> tuple[int, list[int]]:
        """(the id that ends an assistant turn, every id that ends a response).

        The end-of-turn id is the first special token the chat template writes after an
        assistant message (Gemma3: <end_of_turn>, Qwen: <|im_end|>), else the tokenizer's
        EOS. It is appended to a sampled response that ended with EOS but whose kept
        tokens lack it (the search marks a parent final when a child is a bare EOS).
        """
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id
        ends = {eos} if eos is not None else set()
        end = eos
        if getattr(self.processor, "chat_template", None):
            marker = "Zq"
            turn = [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": marker}]}]
            text = self.processor.apply_chat_template(turn, tokenize=False)
            after = text[text.rindex(marker) + len(marker):] if marker in text else ""
            for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
                if token_id in self.special_ids:
                    end = token_id
                    ends.add(token_id)
                    break
        if end is None:
            raise ValueError("the model's tokenizer defines no EOS token; set eos_token in its tokenizer config.")
        return end, sorted(ends)

    def _check(self, raw: bytes) -> None:
        """What can be told without decoding the image: the JSON, the fields, the image file."""
        record = json_object(raw)
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(record.get(key), list):
                raise ValueError(f"field {key!r} must be a list of messages")
        for key in ("chosen", "rejected"):
            ids = record.get(f"{key}_token_ids")
            if ids is not None and not (isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)):
                raise ValueError(f"field '{key}_token_ids' must be a non-empty list of token ids")
        same_ids = record.get("chosen_token_ids") is not None and \
            record.get("chosen_token_ids") == record.get("rejected_token_ids")
        if same_ids or _text_of(record["chosen"]) == _text_of(record["rejected"]):
            raise ValueError("chosen and rejected are identical")
        images = record.get("images") or []
        if images:
            _check_image(images[0])

    # ------------------------------------------------------------- per item
    def _record(self, index: int) -> dict:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            return json.loads(f.readline().decode("utf-8"))

    def record(self, index: int) -> dict:
        """The pair's JSONL record, as written (no tokenizing, no image decoding)."""
        return self._record(index)

    def response_ids(self, index: int) -> tuple[list[int], list[int]]:
        """The pair's chosen and rejected response ids as the trainer sees them, without decoding its image."""
        record = self._record(index)
        prompt_text = self._prompt_text(record)
        return self._response_ids(record, "chosen", prompt_text), self._response_ids(record, "rejected", prompt_text)

    def _prompt_text(self, record: dict) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", "<image>") if record.get("images") else ""
        return LLAVA_PROMPT.format(image=image_token, question=_text_of(record["prompt"]))

    def _response_ids(self, record: dict, key: str, prompt_text: str) -> list[int]:
        """The response's ids as the policy saw them after the prompt.

        Sampled ids are used verbatim. Text is tokenized together with the (unexpanded)
        prompt and the prompt's ids are cut off: the image placeholder is a special token,
        so the boundary tokenizes exactly as in the processor's expanded sequence.
        """
        finished = record.get(f"{key}_finish", "eos") not in LIMIT_FINISHES
        end, end_ids = self.end_ids
        ids = record.get(f"{key}_token_ids")
        if ids is not None:
            ids = list(ids)
            # the sampler never emits a special token other than EOS: a special last id is the EOS it chose
            if finished and ids[-1] not in self.special_ids:
                ids.append(end)
            return ids
        text = _text_of(record[key])
        if not getattr(self.processor, "chat_template", None):   # LLaVA-1.5's format: "ASSISTANT: text</s>"
            full = prompt_text + " " + text + (self.tokenizer.eos_token if finished else "")
        elif finished:
            full = self.processor.apply_chat_template(record["prompt"] + record[key], tokenize=False)
        else:  # cut by a limit: the text as the template starts it, no end of turn
            full = prompt_text + text
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        prompt_ids = self.tokenizer(prompt_text)["input_ids"]
        full_ids = self.tokenizer(full)["input_ids"]
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"the {key} response merges with the prompt's last token under this tokenizer; "
                             f"store {key}_token_ids (csr curate writes them) to train on the sampled ids")
        ids = full_ids[len(prompt_ids):]
        # the template may write more after the end of turn (a newline): the response ends there
        for i, token_id in enumerate(ids):
            if token_id in end_ids:
                return ids[:i + 1]
        return ids

    def encode(self, record: dict) -> dict:
        """One pair -> prompt ids (image placeholder expanded), response ids, image tensors."""
        from csr_plugin.sampling.prompts import load_image

        prompt_text = self._prompt_text(record)
        images = record.get("images") or []
        if images:
            prompt_ids, image_inputs = encode_prompt(self.processor, prompt_text, load_image(images[0]))
        else:
            prompt_ids, image_inputs = self.tokenizer(prompt_text)["input_ids"], {}
        budget = self.max_len - len(prompt_ids)
        if budget < 2:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens, over dpo.max_len={self.max_len}")
        chosen_ids = self._response_ids(record, "chosen", prompt_text)[:budget]
        rejected_ids = self._response_ids(record, "rejected", prompt_text)[:budget]
        if chosen_ids == rejected_ids:
            raise ValueError("chosen and rejected are identical after tokenisation")
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
                "image_inputs": image_inputs}

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict:
        """The pair at ``index``; one that became unusable since start-up is replaced by the next usable one.

        Every rank must run the same number of steps with full micro-batches (ZeRO-3's
        collectives wait for all ranks), so a bad pair is swapped, not dropped or raised.
        """
        from csr_plugin.sampling.prompts import PromptError

        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)}")
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                return self.encode(self._record(i))
            except (PromptError, ValueError, KeyError, TypeError, IndexError, OSError) as exc:
                if i not in self._late_skips:
                    self._late_skips.add(i)
                    self.skipped.append(f"line {self.line_numbers[i]}: {exc}")
                    log.warning("pair on line %d of %s skipped during training, the next pair is used "
                                "instead: %s", self.line_numbers[i], self.path, exc)
        raise ValueError(f"no pair of {self.path} is usable any more; first problem: {self.skipped[0]}")

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def collate_fn(self, items: list[dict]):
        chosen_ids, chosen_mask = right_pad([it["prompt_ids"] + it["chosen_ids"] for it in items], self.pad_id)
        rejected_ids, rejected_mask = right_pad([it["prompt_ids"] + it["rejected_ids"] for it in items], self.pad_id)
        prompts = PromptInputs([len(it["prompt_ids"]) for it in items],
                               concat_image_inputs([it["image_inputs"] for it in items]))
        return chosen_ids, chosen_mask, rejected_ids, rejected_mask, prompts


def load_processor(path: str, trust_remote_code: bool = False, padding_side: Optional[str] = "right"):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if padding_side:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor
