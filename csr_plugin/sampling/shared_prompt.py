"""Attention over a prompt's KV shared by all its rows, plus each row's own tokens.

A sentence step continues every beam of a prompt with K candidates. The prompt (image tokens
included: 576 for LLaVA-1.5, about 0.5 MiB of KV each at 7B) is the same for all of them, so
holding it once per prompt instead of once per row is what bounds memory: 16 prompts x 3 beams
x 8 candidates would otherwise copy it 384 times. The rows keep only their own tokens (the last
prompt token, the beam's prefix and what they generate) in an ordinary cache; this attention
function, registered with transformers' attention interface, attends to the two parts
separately and merges them by their log-sum-exp, which is exactly softmax attention over the
concatenation (cascade attention). Computed in float32; the result equals the plain attention
up to rounding.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional

import torch

NAME = "csr_shared_prompt"
_state = threading.local()


@dataclass
class SharedPrompts:
    """What the attention function reads during one forward: per prompt and layer the prompt's own
    (keys, values), each [kv_heads, length, head_dim], and which prompt each batch row continues."""
    layers: list[list[tuple[torch.Tensor, torch.Tensor]]]   # [prompt][layer] -> (keys, values)
    prompt_of_row: torch.Tensor
    fallback: str = "sdpa"

    def __post_init__(self) -> None:
        self.select(self.prompt_of_row)

    def select(self, prompt_of_row: torch.Tensor) -> None:
        """Rows changed (replicated for candidates, or finished rows dropped): regroup them by prompt."""
        self.prompt_of_row = prompt_of_row
        self.groups = [(p, (prompt_of_row == p).nonzero(as_tuple=True)[0]) for p in range(len(self.layers))]
        self.groups = [(p, rows) for p, rows in self.groups if rows.numel()]


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, shared_prompt_attention)


@contextlib.contextmanager
def attending(model, shared: SharedPrompts):
    """Run the text model's attention through :func:`shared_prompt_attention` with ``shared``."""
    register()
    text_config = model.config.get_text_config()
    shared.fallback = text_config._attn_implementation
    text_config._attn_implementation = NAME
    _state.shared = shared
    try:
        yield shared
    finally:
        _state.shared = None
        text_config._attn_implementation = shared.fallback


def shared_prompt_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, softcap: Optional[float] = None, **kwargs):
    """query [B, H, q, d]; key/value [B, kv_heads, S, d] are the rows' own tokens; attention_mask
    [B, 1, q, S] (bool, True = attend) over them. Returns ([B, q, H, d], None) as every
    transformers attention function does."""
    shared: Optional[SharedPrompts] = getattr(_state, "shared", None)
    if shared is None:   # a forward outside `attending` (the prompt prefill): the model's own attention
        from transformers import AttentionInterface

        fallback = AttentionInterface().get("sdpa")
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                        softcap=softcap, **kwargs)
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    q = query.float().view(rows, kv_heads, group, q_len, dim)

    def scores_of(raw: torch.Tensor) -> torch.Tensor:
        raw = raw * scaling
        return softcap * torch.tanh(raw / softcap) if softcap else raw

    # the rows' own tokens: [B, kv, g, q, S]
    local = scores_of(q @ key.float()[:, :, None].transpose(-1, -2))
    if attention_mask is not None:
        local = local.masked_fill(~attention_mask.bool()[:, :, None], float("-inf"))
    local_lse = local.logsumexp(-1)
    # a left-padding query sees none of the rows' own tokens (only the prompt): weight 0, not 0/0
    finite_lse = torch.where(torch.isinf(local_lse), torch.zeros_like(local_lse), local_lse)
    out = (local - finite_lse[..., None]).exp() @ value.float()[:, :, None]       # [B, kv, g, q, d]

    layer = module.layer_idx
    for p, members in shared.groups:
        keys, values = shared.layers[p][layer]                                   # [kv, L, d]
        n = members.numel()
        # fold the prompt's rows into the query length: one matmul against its keys, none copied
        qp = q[members].permute(1, 0, 2, 3, 4).reshape(kv_heads, n * group * q_len, dim)
        prompt_scores = scores_of(qp @ keys.float().transpose(-1, -2))             # [kv, n*g*q, L]
        prompt_lse = prompt_scores.logsumexp(-1)
        prompt_out = (prompt_scores - prompt_lse[..., None]).exp() @ values.float()
        prompt_out = prompt_out.view(kv_heads, n, group, q_len, dim).permute(1, 0, 2, 3, 4)
        prompt_lse = prompt_lse.view(kv_heads, n, group, q_len).permute(1, 0, 2, 3)
        own_lse, own_out = local_lse[members], out[members]
        total = torch.logaddexp(own_lse, prompt_lse)
        out[members] = (own_out * (own_lse - total).exp()[..., None]
                        + prompt_out * (prompt_lse - total).exp()[..., None])
    out = out.view(rows, heads, q_len, dim).transpose(1, 2).contiguous().to(query.dtype)
    return out, None
