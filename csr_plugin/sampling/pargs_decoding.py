"""PARGS tokenwise reward-guided decoding (Rashid et al., arXiv 2406.07780), batched and KV-cached.

At step t the policy gives log π(v | x, y<t); its top-k tokens v_1..v_k are each scored by a
partial-sequence reward model, r_i = r(x, y<t v_i), and the next token is drawn from

    π'(v_i) ∝ π(v_i) · exp(w · r_i)   over the k candidates

(greedy variant: its argmax). Sampling is Gumbel-max with counter-based noise that depends only on
(row seed, step, candidate rank), so a row draws the same token whatever shares its batch, and the
naive reference below draws exactly what the incremental decoder draws.

:func:`guided_decode` — per step ONE policy decode step for all live rows and ONE reward-model
decode step for all rows x k candidates on the reward model's KV cache of each row's prefix (prompt and
image prefilled once). By default the k candidates of a row are k query tokens of that step on the row's
own cache, kept apart by a 4D mask (no copy of the cache); ``sharing="expand"`` repeats the cache k-fold
instead. The reward is the head on the candidate's hidden state (it is the last token), and the chosen
candidate's cache entry becomes the next step's prefix. :func:`guided_decode_naive` — the reference
code's cost: one full policy forward per row and step and one full reward-model forward per candidate,
no caches. All give the same tokens for the same seeds (tests/test_guided_decoding.py).

:func:`guided_decode_rows` is the same decoder returning each row's policy log-probs (log π, before the
temperature and the reward) and why it ended; ``DecodeSetup.stop_ids`` end a row like EOS (finish
"sentence"). `csr sample` with search.decoding: pargs draws its candidate sentences through it
(csr_plugin/sampling/pargs_engine.py, tests/test_pargs_sampling.py); ``csr eval`` uses :func:`guided_decode`.

Families: every one of csr_plugin.multimodal (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Gemma3, Idefics3,
SmolVLM), each tested against the naive decoder on its tiny model. Positions are explicit (left padding
and dropped rows change nothing; M-RoPE text positions after the image). Sliding-window layers (Gemma3)
are exact only while prompt + response + k stays inside the window: the 4D mask replaces the model's own
window mask, so a longer request is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from csr_plugin.multimodal import SUPPORTED_FAMILIES, batch_inputs, family_of
from csr_plugin.reward_model.model import MultimodalRewardModel, _hf_model
from csr_plugin.sampling.transformers_engine import _sliding_window, counter_gumbel

SUPPORTED = SUPPORTED_FAMILIES   # each is checked against the naive decoder in tests/test_guided_decoding.py


@dataclass
class PargsSettings:
    top_k: int = 10          # paper: k = 10
    weight: float = 2.0      # paper: w = 2 sampling, w = 1 greedy
    greedy: bool = False
    max_new_tokens: int = 64
    # divides the policy's logits before w·r is added: log π_τ(v_i) + w·r_i (1 = the paper's π; the
    # candidates are the same top k whatever τ, and the reported log-probs stay those of π itself)
    temperature: float = 1.0


@dataclass
class DecodeSetup:
    """What both decoders need besides the two models: token ids the policy may not emit, EOS, pad,
    and tokens that end a row like EOS but report finish "sentence" (`csr sample`'s sentence ends)."""
    eos_ids: set[int]
    pad_id: int
    banned_ids: frozenset[int] = frozenset()
    stop_ids: frozenset[int] = frozenset()


@dataclass
class GuidedRow:
    """One decoded row: its new tokens, log π(token) under the policy itself (untempered, unguided, before
    the banned-token mask: what R_T needs), and why it ended: eos, sentence (a stop id) or length."""
    token_ids: list[int]
    logprobs: list[float]
    finish: str = "length"

    def end(self, token: int, setup: DecodeSetup) -> None:
        if token in setup.eos_ids:
            self.finish = "eos"
        elif token in setup.stop_ids:
            self.finish = "sentence"


def check_window(policy, prompts: Sequence[list[int]], settings: PargsSettings) -> None:
    window = _sliding_window(policy.config)
    longest = max(map(len, prompts)) + settings.max_new_tokens + settings.top_k
    if window is not None and longest >= window:
        raise ValueError(f"PARGS decoding needs prompt + max_new_tokens + top_k ({longest}) below the model's sliding "
                         f"window ({window}): lower eval.max_new_tokens or eval.pargs.top_k (`csr sample`: "
                         "search.max_new_tokens, search.pargs.top_k), or shorten the prompt.")


def check_models(policy, reward_model: MultimodalRewardModel, settings: PargsSettings) -> None:
    # family_of refuses a family csr_plugin.multimodal does not know, naming the supported ones
    if family_of(policy.config).model_type != family_of(reward_model.backbone.config).model_type:
        raise ValueError("the reward model's backbone family differs from the policy's: both read the same token "
                         "ids and image inputs, so train the reward model (`csr train-rm`) on the policy's base.")
    vocab = policy.get_output_embeddings().weight.shape[0]
    if reward_model.backbone.get_input_embeddings().weight.shape[0] < vocab:
        raise ValueError("the reward model's vocabulary is smaller than the policy's: train it from the policy's base.")
    if settings.top_k < 1 or settings.max_new_tokens < 1:
        raise ValueError(f"PARGS top_k ({settings.top_k}) and max_new_tokens ({settings.max_new_tokens}) must be >= 1 "
                         "(eval.pargs.top_k, eval.max_new_tokens; `csr sample`: search.pargs.top_k, "
                         "search.max_new_tokens).")
    if settings.temperature <= 0:
        raise ValueError(f"PARGS temperature must be > 0, got {settings.temperature} (search.temperature).")


def _candidates(logits: torch.Tensor, banned: torch.Tensor, k: int, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π_τ of the top-k tokens (the score's policy term), their ids, their log π), all [rows, k], best
    first; banned tokens never enter. τ = 1: the first and last are the same tensor."""
    logp = logits.float().log_softmax(-1)
    top = logp.masked_fill(banned, float("-inf")).topk(k, dim=-1)
    if temperature == 1.0:
        return top.values, top.indices, top.values
    tempered = (logits.float() / temperature).log_softmax(-1).gather(-1, top.indices)
    return tempered, top.indices, top.values


def _choose(logp_top: torch.Tensor, rewards: torch.Tensor, settings: PargsSettings, row_seeds: torch.Tensor,
            step: int) -> torch.Tensor:
    """Index in 0..k-1 of the chosen candidate per row: argmax of log π + w·r (+ Gumbel noise to sample)."""
    score = logp_top + settings.weight * rewards
    if not settings.greedy:
        score = score + counter_gumbel(row_seeds, step, score.shape[-1])
    return score.argmax(-1)


def _banned_mask(setup: DecodeSetup, vocab: int, device) -> torch.Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[[i for i in setup.banned_ids if 0 <= i < vocab]] = True
    return mask


def _positions(config, kwargs: dict, rows: list[list[int]]) -> torch.Tensor:
    """Explicit prefill positions (set in kwargs) for a left-padded batch; returns each row's next one."""
    if family_of(config).mrope:
        return kwargs["position_ids"][:, :, -1].max(0).values + 1
    kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return torch.tensor([len(r) for r in rows])


def _to(kwargs: dict, device, dtype) -> dict:
    out = {k: v.to(device) for k, v in kwargs.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _text_positions(next_pos: torch.Tensor, width: int, mrope: bool) -> torch.Tensor:
    pos = next_pos[:, None].expand(-1, width)
    return pos[None].expand(3, -1, -1) if mrope else pos


def _candidates_side_by_side(rm_inner, cache, attention: torch.Tensor, cand: torch.Tensor, next_pos: torch.Tensor,
                             mrope: bool):
    """The k candidates of a row as k query tokens of ONE step on the row's own prefix cache (no copy).

    A 4D mask lets candidate i see the row's prefix and itself only, and all k sit at the same position,
    so each one's hidden state is exactly that of prefix + v_i. The step appends all k to the cache;
    ``keep_chosen`` cuts them back to the chosen one in place, so a step copies the cache once (in the
    step's own concatenation), as a plain decode step does.
    """
    impl = getattr(rm_inner.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):   # flash-attention kernels take no custom 4D mask
        raise ValueError(f"the reward model runs attention {impl!r}, which takes no 4D mask: load it with sdpa or "
                         "eager attention, or call guided_decode(..., sharing='expand').")
    rows, k = cand.shape
    width = attention.shape[1]
    dtype = next(rm_inner.parameters()).dtype
    allowed = torch.cat([attention.bool()[:, None, None, :].expand(rows, 1, k, width),
                         torch.eye(k, dtype=torch.bool, device=cand.device).expand(rows, 1, k, k)], -1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=cand.device).masked_fill(~allowed, torch.finfo(dtype).min)
    out = rm_inner(input_ids=cand, attention_mask=mask, past_key_values=cache,
                   position_ids=_text_positions(next_pos, k, mrope), use_cache=True)

    def keep_chosen(pick: torch.Tensor):
        row_idx, col = torch.arange(rows, device=pick.device), width + pick
        for layer in out.past_key_values.layers:
            # the chosen entry moves to the first candidate slot and the cache ends there: a view, no copy
            # (the gather on the right copies before the write, so candidate slots never overlap it)
            layer.keys[:, :, width] = layer.keys[row_idx, :, col]
            layer.values[:, :, width] = layer.values[row_idx, :, col]
            layer.keys, layer.values = layer.keys[:, :, :width + 1], layer.values[:, :, :width + 1]
        return out.past_key_values
    return out.last_hidden_state, keep_chosen


def _candidates_expanded(rm_inner, cache, attention: torch.Tensor, cand: torch.Tensor, next_pos: torch.Tensor,
                         mrope: bool):
    """The k candidates as rows·k single-token rows on the prefix cache repeated k-fold (copies it k times)."""
    rows, k = cand.shape
    cache.batch_repeat_interleave(k)
    rm_attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1).repeat_interleave(k, 0)
    out = rm_inner(input_ids=cand.reshape(-1, 1), attention_mask=rm_attention, past_key_values=cache,
                   position_ids=_text_positions(next_pos.repeat_interleave(k), 1, mrope), use_cache=True)

    def keep_chosen(pick: torch.Tensor):
        out.past_key_values.batch_select_indices(torch.arange(rows, device=pick.device) * k + pick)
        return out.past_key_values
    return out.last_hidden_state[:, -1].view(rows, k, -1), keep_chosen


SHARING = ("mask", "expand")


@torch.inference_mode()
def guided_decode(policy, reward_model: MultimodalRewardModel, prompts: Sequence[list[int]],
                  image_inputs: Sequence[dict], seeds: Sequence[int], settings: PargsSettings,
                  setup: DecodeSetup, sharing: str = "mask") -> list[list[int]]:
    """New token ids per row (EOS included when emitted), incremental: see the module docstring.

    ``sharing``: how the k candidates share a row's prefix cache — ``mask`` (default: k query tokens on
    the one cache, kept apart by the attention mask) or ``expand`` (the cache repeated k-fold)."""
    rows = guided_decode_rows(policy, reward_model, prompts, image_inputs, seeds, settings, setup, sharing)
    return [row.token_ids for row in rows]


def _unique_rows(rows: list[list[int]], image_inputs: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(first row of each distinct (ids, image inputs object), the distinct row of every row): rows that
    repeat one (`csr sample`'s K candidates of a beam) are prefilled once and their caches repeated."""
    seen: dict[tuple, int] = {}
    firsts, of_row = [], []
    for i, row in enumerate(rows):
        key = (tuple(row), id(image_inputs[i]))
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(i)
        of_row.append(seen[key])
    return firsts, of_row


@torch.inference_mode()
def guided_decode_rows(policy, reward_model: MultimodalRewardModel, prompts: Sequence[list[int]],
                       image_inputs: Sequence[dict], seeds: Sequence[int], settings: PargsSettings,
                       setup: DecodeSetup, sharing: str = "mask") -> list[GuidedRow]:
    """:func:`guided_decode` with each row's policy log-probs and finish reason; rows also end after a token
    of ``setup.stop_ids`` (finish "sentence"). Identical rows (same ids, same image inputs object) share
    one prefill of each model."""
    if sharing not in SHARING:
        raise ValueError(f"sharing must be one of {', '.join(SHARING)}, got {sharing!r}.")
    check_models(policy, reward_model, settings)
    check_window(policy, prompts, settings)
    device, rm_inner = next(policy.parameters()).device, _hf_model(reward_model.backbone).model
    rm_dtype = next(reward_model.backbone.parameters()).dtype
    mrope = family_of(policy.config).mrope
    rows = [list(p) for p in prompts]
    n, k = len(rows), settings.top_k
    firsts, of_row = _unique_rows(rows, image_inputs)
    distinct = [rows[i] for i in firsts]
    kwargs = batch_inputs(policy.config, distinct, [image_inputs[i] for i in firsts], setup.pad_id, "left")
    next_pos = _positions(policy.config, kwargs, distinct).to(device)
    pol = policy(**_to(kwargs, device, policy.dtype), use_cache=True, logits_to_keep=1)
    # The reward model reads the same ids and images; its prefix cache is the prompt's, computed once.
    rm_out = rm_inner(**_to(kwargs, device, rm_dtype), use_cache=True)
    pol_cache, rm_cache, logits = pol.past_key_values, rm_out.past_key_values, pol.logits[:, -1]
    attention = kwargs["attention_mask"].to(device)
    if len(distinct) < n:   # each row gets its own copy of its distinct prefix's caches
        index = torch.tensor(of_row, device=device)
        pol_cache.batch_select_indices(index)
        rm_cache.batch_select_indices(index)
        logits, attention, next_pos = logits[index], attention[index], next_pos[index]
    banned = _banned_mask(setup, logits.shape[-1], device)
    stop = torch.tensor(sorted(set(setup.eos_ids) | set(setup.stop_ids)), device=device)
    row_seeds = torch.tensor(list(seeds), dtype=torch.long, device=device)
    live = torch.arange(n, device=device)            # original row of each batch row
    out = [GuidedRow([], []) for _ in range(n)]
    step_fn = _candidates_side_by_side if sharing == "mask" else _candidates_expanded
    for step in range(settings.max_new_tokens):
        score_top, cand, logp_top = _candidates(logits, banned, k, settings.temperature)
        hidden, keep_chosen = step_fn(rm_inner, rm_cache, attention, cand, next_pos, mrope)
        rewards = reward_model.head(hidden.to(reward_model.head_weight_dtype())).squeeze(-1).float()
        pick = _choose(score_top, rewards, settings, row_seeds[live], step)
        token = cand.gather(1, pick[:, None]).squeeze(1)
        chosen_logp = logp_top.gather(1, pick[:, None]).squeeze(1)
        rm_cache = keep_chosen(pick)   # the prefix cache of the next step: prefix + the chosen token
        for r, t, lp in zip(live.tolist(), token.tolist(), chosen_logp.tolist()):
            out[r].token_ids.append(t)
            out[r].logprobs.append(lp)
            out[r].end(t, setup)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
        going = ~torch.isin(token, stop)
        if step == settings.max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):   # finished rows leave both batches: no work is spent on them
            keep = going.nonzero(as_tuple=True)[0]
            pol_cache.batch_select_indices(keep)
            rm_cache.batch_select_indices(keep)
            live, token, attention, next_pos = live[keep], token[keep], attention[keep], next_pos[keep]
        pos = next_pos[:, None]
        pol = policy(input_ids=token[:, None], attention_mask=attention, past_key_values=pol_cache,
                     position_ids=pos[None].expand(3, -1, -1) if mrope else pos, use_cache=True)
        pol_cache, logits, next_pos = pol.past_key_values, pol.logits[:, -1], next_pos + 1
    return out


@torch.inference_mode()
def guided_decode_naive(policy, reward_model: MultimodalRewardModel, prompts: Sequence[list[int]],
                        image_inputs: Sequence[dict], seeds: Sequence[int], settings: PargsSettings,
                        setup: DecodeSetup) -> list[list[int]]:
    """The reference: per row and step one full policy forward and one full RM forward per candidate."""
    check_models(policy, reward_model, settings)
    device = next(policy.parameters()).device
    rm_dtype = next(reward_model.backbone.parameters()).dtype
    out: list[list[int]] = []
    for prompt, images, seed in zip(prompts, image_inputs, seeds):
        row_seed = torch.tensor([seed], dtype=torch.long, device=device)
        new: list[int] = []
        for step in range(settings.max_new_tokens):
            kwargs = _to(batch_inputs(policy.config, [list(prompt) + new], [images], setup.pad_id),
                         device, policy.dtype)
            _positions(policy.config, kwargs, [list(prompt) + new])
            logits = policy(**kwargs, use_cache=False).logits[:, -1]
            score_top, cand, _ = _candidates(logits, _banned_mask(setup, logits.shape[-1], device), settings.top_k,
                                             settings.temperature)
            rewards = []
            for token in cand[0].tolist():
                full = [list(prompt) + new + [token]]
                rm_kwargs = _to(batch_inputs(policy.config, full, [images], setup.pad_id), device, rm_dtype)
                _positions(policy.config, rm_kwargs, full)
                rewards.append(reward_model(**rm_kwargs))
            pick = _choose(score_top, torch.cat(rewards)[None], settings, row_seed, step)
            new.append(int(cand[0, pick]))
            if new[-1] in setup.eos_ids or new[-1] in setup.stop_ids:
                break
        out.append(new)
    return out


def setup_for(processor, policy) -> DecodeSetup:
    """EOS, pad and the never-emitted special tokens of a policy, as the sampling engine takes them."""
    from csr_plugin.multimodal import control_token_ids
    from csr_plugin.sampling.engine import never_sampled_ids

    tokenizer = getattr(processor, "tokenizer", processor)
    eos = set()
    for source in (getattr(policy.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        eos.update([source] if isinstance(source, int) else (source or []))
    if not eos:
        raise ValueError("the policy's tokenizer defines no EOS token; set eos_token in its tokenizer config.")
    vocab = policy.get_output_embeddings().weight.shape[0]
    banned = never_sampled_ids(tokenizer, eos, control_token_ids(policy.config, processor), vocab)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return DecodeSetup(eos_ids=eos, pad_id=pad, banned_ids=frozenset(banned))


def decode_prompts(policy, reward_model, processor, items: Sequence[tuple], seeds: Sequence[int],
                   settings: PargsSettings, batch: int, setup: Optional[DecodeSetup] = None) -> list[str]:
    """Answers for (PIL image, question) items, ``batch`` rows per guided decode (``csr eval``)."""
    from csr_plugin.multimodal import chat_prompt, encode_prompt

    setup = setup or setup_for(processor, policy)
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = []
    for start in range(0, len(items), batch):
        chunk = [encode_prompt(processor, chat_prompt(processor, q), image) for image, q in items[start:start + batch]]
        new = guided_decode(policy, reward_model, [c[0] for c in chunk], [c[1] for c in chunk],
                            seeds[start:start + batch], settings, setup)
        texts += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]
    return texts
