"""Sentence engine whose candidates are drawn with PARGS reward-guided decoding (search.decoding: pargs).

The transformers engine with its token choice replaced: every token of a candidate sentence is chosen
among the policy's top k by log π_τ(v) + w · r(x, y<t v), r from the partial-sequence reward model of
``search.rm`` (csr_plugin/sampling/pargs_decoding.py). One ``expand`` call is ONE batched, KV-cached
guided decode over all candidates of all requests: each (prompt + prefix) is prefilled once in both
models and its caches copied to its n candidates, candidate k of a request is seeded
``stable_seed(request.seed, k)`` as in the sampling engine, and a candidate stops after a sentence end
(finish "sentence"), at EOS ("eos") or at search.max_new_tokens ("length"), with the sampling engine's
sentence-end, EOS and banned ids. ``Continuation.logprobs`` are log π(token) of the policy itself (no
temperature, no reward): what the search's R_T needs.

τ is ``search.temperature`` (1 = the paper's π); search.top_p does not apply (PARGS's top_k restricts
the candidates instead). The prompt cache of the sampling engine is not used: the prompt is prefilled
with the prefix at each call, in both models.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from csr_plugin.config import ModelConfig, SearchConfig
from csr_plugin.sampling.pargs_decoding import DecodeSetup, PargsSettings, guided_decode_rows
from csr_plugin.sampling.engine import Continuation, Expansion, added_text, stable_seed
from csr_plugin.sampling.transformers_engine import TransformersEngine, load_vlm

log = logging.getLogger(__name__)


def check_search_rm(search: SearchConfig) -> None:
    from csr_plugin.reward_model.model import CONFIG_FILE

    if not (Path(search.rm) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"search.rm {search.rm!r} holds no {CONFIG_FILE}: give the final/ folder "
                                "`csr train-rm` wrote (e.g. runs/rm/final), or set search.decoding: sample.")


def load_search_reward_model(search: SearchConfig, model_cfg: ModelConfig, policy):
    """The reward model of ``search.rm``, in the policy's dtype on the policy's device."""
    from csr_plugin.reward_model.model import load_reward_model

    check_search_rm(search)
    device = next(policy.parameters()).device
    return load_reward_model(search.rm, dtype=policy.dtype, trust_remote_code=model_cfg.trust_remote_code).to(device)


class PargsEngine(TransformersEngine):
    """`TransformersEngine` (prompts, EOS, sentence ends, banned ids) with PARGS choosing the tokens."""

    def __init__(self, model, processor, search: SearchConfig, reward_model):
        super().__init__(model, processor, search, prompt_cache=False)
        self.reward_model = reward_model
        self.settings = PargsSettings(top_k=search.pargs.top_k, weight=search.pargs.weight,
                                      greedy=search.pargs.greedy, max_new_tokens=search.max_new_tokens,
                                      temperature=search.temperature)
        ids = lambda mask: frozenset(mask.nonzero(as_tuple=True)[0].tolist())  # noqa: E731
        self.setup = DecodeSetup(eos_ids=set(self.eos_ids), pad_id=self.pad_id, banned_ids=ids(self.banned_mask),
                                 stop_ids=ids(self.sentence_end_mask))
        if search.top_p < 1.0:
            log.warning("search.top_p=%g does not apply with search.decoding: pargs (its candidates are the "
                        "policy's top %d tokens, search.pargs.top_k)", search.top_p, search.pargs.top_k)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, search: SearchConfig) -> "PargsEngine":
        check_search_rm(search)   # before the policy loads
        model, processor = load_vlm(model_cfg)
        return cls(model, processor, search, load_search_reward_model(search, model_cfg, model))

    @torch.inference_mode()
    def _expand(self, requests: Sequence[Expansion]) -> list[list[Continuation]]:
        prompts, images, seeds, of_row = [], [], [], []
        for i, request in enumerate(requests):
            for k in range(request.n):
                prompts.append(request.prompt.token_ids + request.prefix_ids)
                images.append(request.prompt.image_inputs)   # the prompt's own object: a request's rows prefill once
                seeds.append(stable_seed(request.seed, k))
                of_row.append(i)
        self.stats["prefill_tokens"] += sum(len(r.prompt.token_ids) + len(r.prefix_ids) for r in requests)
        rows = guided_decode_rows(self.model, self.reward_model, prompts, images, seeds, self.settings, self.setup)
        results: list[list[Continuation]] = [[] for _ in requests]
        for i, row in zip(of_row, rows):
            prefix = requests[i].prefix_ids
            results[i].append(Continuation(token_ids=row.token_ids, logprobs=row.logprobs,
                                           text=added_text(self.tokenizer, prefix, row.token_ids), finish=row.finish))
        return results
