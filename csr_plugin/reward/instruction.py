"""Instruction-following score R_T from the log-probs the generation itself produced.

Paper (arXiv 2405.14622, eq. 3): R_T(s) = prod_o P(r_o | x, r_<o). We work in log
space. ``mean`` (the default) is the length-normalised log-likelihood the official
code takes from HF beam ``sequences_scores``: the summed form prefers short
sentences, since every extra token can only lower it, which would let the search
reward terseness instead of fluency.
"""
from __future__ import annotations

import math
from typing import Sequence


def instruction_score(logprobs: Sequence[float], form: str = "mean") -> float:
    """R_T of one sentence from its per-token log-probs (no extra forward pass)."""
    if not logprobs:
        raise ValueError("instruction_score needs at least one token log-prob; got an empty sentence.")
    total = math.fsum(logprobs)
    if form == "sum":
        return total
    if form == "mean":
        return total / len(logprobs)
    raise ValueError(f"instruction score form must be 'mean' or 'sum', got {form!r}.")
