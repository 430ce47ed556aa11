"""Stand-in for vllm.sampling_params: the fields our engine and OpenRLHF set, with vLLM's defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 (or -1) = no top-k, as in vLLM
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    logprobs: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    skip_special_tokens: bool = True
    ignore_eos: bool = False
