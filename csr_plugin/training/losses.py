"""Preference losses beyond OpenRLHF's DPOLoss (which already gives DPO, cDPO and IPO).

TDPO (Zeng et al., token-level DPO; Vance0124/Token-level-Direct-Preference-Optimization):
    margin  = sum_t [log pi(y_t) - log pi_ref(y_t)]                 per response
    SeqKL   = sum_t KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t))          over response positions
    u       = margin_w - margin_l
    TDPO1:  z = u - (SeqKL_l - SeqKL_w)
    TDPO2:  z = u - alpha * (SeqKL_l - stopgrad(SeqKL_w))
    loss    = -log sigmoid(beta * z)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to fp32 for the softmax; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _ChunkedSequenceKL(torch.autograd.Function):
    """sum_t mask_t * KL(softmax(ref_t) || softmax(policy_t)), per sequence, a chunk of positions at a time.

    Autograd through log_softmax would keep [batch, length, vocab] activations alive for
    every chunk; here backward recomputes each chunk from the logits it already holds:
    d KL_t / d policy_t = softmax(policy_t) - softmax(ref_t). log_softmax throughout, never
    softmax().log(), which turns underflowed probabilities into NaN.
    """

    @staticmethod
    def forward(ctx, policy_logits, ref_logits, mask, chunk):
        ctx.save_for_backward(policy_logits, ref_logits, mask)
        ctx.chunk = chunk
        total = torch.zeros(policy_logits.shape[0], dtype=_upcast(policy_logits[:0]).dtype,
                            device=policy_logits.device)
        for start in range(0, policy_logits.shape[1], chunk):
            window = slice(start, start + chunk)
            ref_logp = _upcast(ref_logits[:, window]).log_softmax(-1)
            policy_logp = _upcast(policy_logits[:, window]).log_softmax(-1)
            kl = (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)
            total += (kl * mask[:, window]).sum(-1)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        policy_logits, ref_logits, mask = ctx.saved_tensors
        grad = torch.zeros_like(policy_logits)
        for start in range(0, policy_logits.shape[1], ctx.chunk):
            window = slice(start, start + ctx.chunk)
            diff = _upcast(policy_logits[:, window]).softmax(-1) - _upcast(ref_logits[:, window]).softmax(-1)
            scale = (grad_total[:, None] * mask[:, window])[..., None]
            grad[:, window] = (diff * scale).to(grad.dtype)
        return grad, None, None, None


def sequence_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor,
                chunk: int = 256) -> torch.Tensor:
    """Per-sequence sum of KL(pi_ref || pi) over positions where ``mask`` is 1 ([batch, length] each)."""
    return _ChunkedSequenceKL.apply(policy_logits, ref_logits.detach(), mask.to(_upcast(policy_logits[:0]).dtype),
                                    chunk)


def tdpo_loss(chosen_margin: torch.Tensor, rejected_margin: torch.Tensor, chosen_kl: torch.Tensor,
              rejected_kl: torch.Tensor, beta: float, alpha: float = 0.5, variant: str = "tdpo2") -> torch.Tensor:
    u = chosen_margin - rejected_margin
    if variant == "tdpo1":
        z = u - (rejected_kl - chosen_kl)
    elif variant == "tdpo2":
        z = u - alpha * (rejected_kl - chosen_kl.detach())
    else:
        raise ValueError(f"TDPO variant must be tdpo1 or tdpo2, got {variant!r}")
    return -F.logsigmoid(beta * z)
