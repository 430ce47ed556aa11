"""What the sentence-level search needs from a generation engine.

An engine continues many (prompt, response-prefix) pairs at once, K candidate
next sentences each, stopping at end of sentence, EOS or ``max_new_tokens``.
The transformers engine and the vLLM engine implement the same contract, so the
search never knows which one runs.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional, Protocol, Sequence

WORD_CHARS = re.compile(r"\w")   # a sentence needs one of these for CLIP to have anything to score

FinishReason = Literal["sentence", "eos", "length"]


@dataclass
class EncodedPrompt:
    """A prompt ready for an engine: its token ids and the engine's image inputs."""
    token_ids: list[int]
    image_inputs: Any  # transformers: processor tensors; vLLM: multi_modal_data
    # Context the prompt occupies. vLLM prompts hold one image placeholder that vLLM expands
    # (LLaVA-1.5: to 576 tokens), so their ids undercount it; None = len(token_ids).
    context_length: Optional[int] = None

    @property
    def length(self) -> int:
        return self.context_length if self.context_length is not None else len(self.token_ids)


@dataclass
class Expansion:
    """Continue ``prompt`` + ``prefix_ids`` (the response so far) with ``n`` candidates.

    ``seed`` fixes this request's sampling whatever else shares the batch, so a
    resumed run draws exactly what an uninterrupted one would (vLLM: per-request seed).
    """
    prompt: EncodedPrompt
    prefix_ids: list[int]
    n: int
    seed: int = 0


@dataclass
class Continuation:
    token_ids: list[int]
    logprobs: list[float]  # log P(token) under the model, before temperature / penalties
    text: str              # the text these tokens add to the prefix's text
    finish: FinishReason

    @property
    def eos_only(self) -> bool:
        """EOS with no word before it (punctuation at most): no sentence; the search instead marks
        the response ending at the prefix complete."""
        return self.finish == "eos" and not WORD_CHARS.search(self.text)


class SentenceEngine(Protocol):
    max_context: int

    def encode_prompt(self, question: str, image) -> EncodedPrompt: ...

    def expand(self, requests: Sequence[Expansion]) -> list[list[Continuation]]: ...


def never_sampled_ids(tokenizer, eos_ids: set[int], control_ids: Iterable[int], vocab_size: int) -> set[int]:
    """Special tokens other than EOS (pad, bos) and every multimodal control token the model names
    (``multimodal.control_token_ids``: image and video placeholders and their delimiters, flagged
    special or not): never generated, since a sampled <image> token in a prefix would break the
    next prefill and a sampled video token breaks training."""
    special = set(tokenizer.all_special_ids) | set(control_ids)
    return {i for i in special - set(eos_ids) if isinstance(i, int) and 0 <= i < vocab_size}


def added_text(tokenizer, prefix_ids: list[int], new_ids: list[int]) -> str:
    """The text ``new_ids`` add after ``prefix_ids``. Decoded in context (SentencePiece drops a
    leading space when a piece is decoded alone), so a node's text is the same whichever engine made it."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    before = decode(prefix_ids)
    after = decode(prefix_ids + new_ids)
    return after[len(before):] if after.startswith(before) else decode(new_ids)


def stable_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
