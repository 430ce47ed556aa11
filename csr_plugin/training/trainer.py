"""OpenRLHF's DPOTrainer, extended only where images (and TDPO's per-position KL) require it.

The training loop, logging, evaluation and checkpointing are OpenRLHF's. We
override the concatenated chosen/rejected forward to pass the pixel inputs (the
image is shared by chosen and rejected, so it is repeated once), and compute the
reference model in the same call: TDPO needs both models' full distributions at
once, and the reference forward that the loop requests next is then served from
that call instead of being run twice.

Per-image tensors come from the collate (tiles padded across the micro-batch) and are
stacked twice, chosen rows then rejected rows, in the order of ``concatenated_inputs``.
Per-token ones are not passed: OpenRLHF's ``Actor.forward`` for a VLM (``is_vlm``, set by
``load_actor``) rebuilds ``mm_token_type_ids`` (Qwen) or ``token_type_ids`` (Gemma3) for the
full padded sequences from the image token id, and passes ``position_ids=None`` so Qwen-VL
computes its own 3-D M-RoPE positions rather than getting 1-D ones.
tests/test_family_pipeline.py checks the log-probs against plain forwards for every family.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from openrlhf.trainer.dpo_trainer import DPOTrainer

from csr_plugin.training.losses import sequence_kl, tdpo_loss


class MultimodalDPOTrainer(DPOTrainer):
    def __init__(self, *args, loss: str = "dpo", alpha: float = 0.5, kl_chunk: int = 256,
                 metrics_path: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_name = loss
        if loss.startswith("tdpo"):
            self.loss_fn = self._tdpo_loss
        self.alpha = alpha
        self.kl_chunk = kl_chunk
        self.metrics_path = metrics_path
        self._reference: Optional[tuple] = None
        self._sequence_kl: Optional[tuple] = None
        self._margins: list[float] = []

    def concatenated_forward(self, model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens):
        if model is self.ref_model and self._reference is not None:
            reference, self._reference = self._reference, None
            return reference
        input_ids, att_masks, prompt_lens, image_inputs = self.forward_inputs(
            model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens)
        n = chosen_ids.shape[0]

        log_probs, output = model(input_ids, attention_mask=att_masks, return_output=True, return_logprobs=True,
                                  **image_inputs)
        logps_sum, logps_mean = self._get_batch_logps(log_probs, att_masks, prompt_lens)
        if model is not self.ref_model:
            with torch.no_grad():
                ref_log_probs, ref_output = self.ref_model(input_ids, attention_mask=att_masks, return_output=True,
                                                           return_logprobs=True, **image_inputs)
            ref_sum, _ = self._get_batch_logps(ref_log_probs, att_masks, prompt_lens)
            self._reference = (ref_sum[:n], ref_sum[n:], [], None)
            if self.loss_name.startswith("tdpo"):
                mask = self._response_mask(att_masks, prompt_lens)
                kl = sequence_kl(output["logits"][:, :-1], ref_output["logits"][:, :-1], mask, self.kl_chunk)
                self._sequence_kl = (kl[:n], kl[n:])
            if model.training:
                self._margins.append(float((logps_sum[:n] - logps_sum[n:]).detach().mean()))
        aux_loss = output.aux_loss if "aux_loss" in output else []
        return logps_sum[:n], logps_sum[n:], aux_loss, -logps_mean[:n].mean()

    def forward_inputs(self, model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens):
        """(input_ids, attention_mask, prompt lengths, image inputs) of the chosen rows then the rejected rows."""
        input_ids, att_masks, prompt_lens = self.concatenated_inputs(
            chosen_ids, c_mask, reject_ids, r_mask, list(prompt_id_lens))
        image_inputs = {}
        for key, value in getattr(prompt_id_lens, "image_inputs", {}).items():
            value = torch.cat([value, value], dim=0).to(chosen_ids.device)  # chosen and rejected share the image
            image_inputs[key] = value.to(self._dtype(model)) if value.is_floating_point() else value
        return input_ids, att_masks, prompt_lens, image_inputs

    @staticmethod
    def _dtype(model) -> torch.dtype:
        return next(p for p in model.parameters()).dtype

    @staticmethod
    def _response_mask(att_masks: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
        """1 where position t predicts a response token (the same mask as _get_batch_logps)."""
        mask = att_masks.clone().bool()
        for row, length in zip(mask, prompt_lens):
            row[:length] = False
        return mask[:, 1:]

    def _tdpo_loss(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
        chosen_kl, rejected_kl = self._sequence_kl
        chosen_margin = chosen_logps - ref_chosen_logps
        rejected_margin = rejected_logps - ref_rejected_logps
        losses = tdpo_loss(chosen_margin, rejected_margin, chosen_kl, rejected_kl, self.beta, self.alpha,
                           self.loss_name)
        return losses.mean(), self.beta * chosen_margin.detach(), self.beta * rejected_margin.detach()

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        logs_dict = dict(logs_dict or {})
        if self._margins:
            margin = self.strategy.all_reduce(sum(self._margins) / len(self._margins))
            logs_dict["logp_margin"] = margin  # policy log p(chosen) - log p(rejected)
            self._margins = []
        if self.metrics_path and self.strategy.is_rank_0() and "loss_mean" in logs_dict:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"global_step": global_step, **logs_dict}) + "\n")
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)


def metrics_summary(path: str) -> dict:
    """First and last logged step of a DPO run, for the iteration's metrics."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    keys = ("loss_mean", "acc_mean", "logp_margin", "chosen_reward", "reject_reward")
    return {"steps": len(rows), **{f"first_{k}": first.get(k) for k in keys}, **{f"last_{k}": last.get(k) for k in keys}}
