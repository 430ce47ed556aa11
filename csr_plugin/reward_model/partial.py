"""PARGS partial-sequence training: a pair's chosen and rejected responses cut at the same token count.

For a pair whose responses have ``len_c`` and ``len_r`` tokens and share their first ``s`` tokens, the
cuts are:

- every L with s < L <= min(len_c, len_r): chosen[:L] against rejected[:L], the same count of
  response tokens on both sides (the prompt, image tokens included, is whole on both);
- the full pair (``FULL``) as well when len_c != len_r: cutting at the shorter length drops the longer
  response's tail, which the whole responses still have to be ranked on. With equal lengths the cut
  at L = len_c is already the full pair.

Cuts L <= s are left out: both sides are then the same sequence and get the same reward, so the
Bradley-Terry gradient of the pair cancels exactly (it is a constant log 2 of loss).

"Every length seen over an epoch": one epoch is the list of every (pair, cut) above for every
training pair, each once, padded by wrapping around to a multiple of ``rm.batch`` so that the
samplers' drop_last removes nothing; the sampler shuffles that list per epoch. A response cut
further by ``rm.max_len`` clamps L to what is left of it (data.py).
"""
from __future__ import annotations

from typing import Optional

FULL: Optional[int] = None   # the cut that keeps both responses whole


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cut_lengths(chosen: list[int], rejected: list[int]) -> list[Optional[int]]:
    """The cuts of one pair, in increasing length, FULL last when the lengths differ."""
    if chosen == rejected:
        raise ValueError("chosen and rejected responses are identical: no cut separates them")
    start, end = shared_prefix(chosen, rejected) + 1, min(len(chosen), len(rejected))
    cuts: list[Optional[int]] = list(range(start, end + 1))
    if len(chosen) != len(rejected):
        cuts.append(FULL)
    return cuts


def cut(chosen: list[int], rejected: list[int], length: Optional[int]) -> tuple[list[int], list[int]]:
    """The pair at one cut; a length past what a (max_len-shortened) response has is clamped to it."""
    if length is FULL:
        return chosen, rejected
    length = min(length, len(chosen), len(rejected))
    return chosen[:length], rejected[:length]


def epoch_items(pairs: list[Optional[tuple[list[int], list[int]]]], batch: int, partial: bool = True
                ) -> list[tuple[int, Optional[int]]]:
    """(pair index, cut) of one epoch: every cut of every pair once (just FULL per pair without ``partial``,
    or for a pair given as None: its ids unknown until its batch), then the first items again until the
    count is a multiple of ``batch``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    items = [(i, length) for i, pair in enumerate(pairs)
             for length in (cut_lengths(*pair) if partial and pair is not None else [FULL])]
    if not items:
        raise ValueError("no pairs to train on")
    return pad_to_multiple(items, batch)


def pad_to_multiple(items: list, batch: int) -> list:
    short = -len(items) % batch
    return items + [items[i % len(items)] for i in range(short)]
