"""Stand-in for vllm.outputs (and vllm's Logprob): what LLM.generate returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None          # 1 = the most likely token
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str] = None            # "stop" | "length"
    stop_reason: Union[int, str, None] = None      # the stop token id; None when EOS stopped it


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]                    # after the image placeholder's expansion, as in V1
    prompt_logprobs: Optional[list]
    outputs: list[CompletionOutput]
    finished: bool
