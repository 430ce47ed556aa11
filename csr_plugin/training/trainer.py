"""OpenRLHF's DPOTrainer, extended only where images (and TDPO's per-position KL) require it.

The training loop, logging, evaluation and checkpointing are OpenRLHF's. One explicit call,
:meth:`MultimodalDPOTrainer.policy_and_reference_forward`, runs the policy and the reference
on a micro-batch with its pixel inputs (the image is shared by chosen and rejected, so it is
repeated once) and returns both: TDPO needs both models' full distributions at once, and the
reference is not run twice.

OpenRLHF's loop (``fit``, ``evaluate``) asks ``concatenated_forward`` for the policy and then,
under no_grad, for the reference of the same micro-batch; its step is inline in ``fit``
(about 100 lines), so it cannot be overridden without copying the loop. The policy request
runs the joint call; the reference request is answered from its result when it is for the
same batch object, else by a reference forward of its own. Images travel as a field of the
batch (:class:`PromptInputs`), the fifth item of the tuple the loop unpacks.

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
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from openrlhf.trainer.dpo_trainer import DPOTrainer

from csr_plugin.training.data import PromptInputs
from csr_plugin.training.losses import sequence_kl, tdpo_loss
from csr_plugin.training.sft_mix import SFTStream


@dataclass
class JointForward:
    """Policy and reference sequence log-probs of one micro-batch (response tokens summed)."""

    prompts: PromptInputs            # the batch they belong to (compared by identity)
    chosen_logps: torch.Tensor       # policy, with grad
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor   # reference, no grad
    ref_rejected_logps: torch.Tensor
    aux_loss: Any
    nll_loss: torch.Tensor           # mean NLL per token of the chosen responses
    chosen_kl: Optional[torch.Tensor] = None    # TDPO: sequential KL(reference || policy) per row
    rejected_kl: Optional[torch.Tensor] = None


class MultimodalDPOTrainer(DPOTrainer):
    def __init__(self, *args, loss: str = "dpo", alpha: float = 0.5, kl_chunk: int = 256,
                 metrics_path: Optional[str] = None, hf_ckpt_steps: int = 0,
                 save_hf_checkpoint: Optional[Callable[[int], None]] = None, sft: Optional[SFTStream] = None,
                 sft_coef: float = 1.0, chosen_nll_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft = sft   # dpo.sft_data: its NLL is the loop's nll_loss term (sft_mix.py)
        self.sft_coef, self.chosen_nll_coef = sft_coef, chosen_nll_coef   # weights used when both NLLs are on
        self.loss_name = loss
        if loss.startswith("tdpo"):
            self.loss_fn = self._tdpo_loss
        self.alpha = alpha
        self.kl_chunk = kl_chunk
        self.metrics_path = metrics_path
        self.hf_ckpt_steps = hf_ckpt_steps
        self.save_hf_checkpoint = save_hf_checkpoint
        self._joint: Optional[JointForward] = None   # the last policy request's result, for its reference request
        self._margins: list[float] = []
        logger = self.strategy.args.logger
        if logger.tensorboard_dir and self._wandb is not None and self.strategy.is_rank_0():
            # OpenRLHF's DPOTrainer writes TensorBoard only without wandb (its PPO writes both): both here.
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=os.path.join(logger.tensorboard_dir, logger.wandb.run_name))

    def policy_and_reference_forward(self, chosen_ids, c_mask, reject_ids, r_mask,
                                     prompts: PromptInputs) -> JointForward:
        """One micro-batch through the policy (with grad when training) and the reference (no grad)."""
        input_ids, att_masks, prompt_lens, image_inputs = self.forward_inputs(
            self.model, chosen_ids, c_mask, reject_ids, r_mask, prompts)
        n = chosen_ids.shape[0]
        log_probs, output = self.model(input_ids, attention_mask=att_masks, return_output=True,
                                       return_logprobs=True, **image_inputs)
        logps_sum, logps_mean = self._get_batch_logps(log_probs, att_masks, prompt_lens)
        with torch.no_grad():
            ref_log_probs, ref_output = self.ref_model(input_ids, attention_mask=att_masks, return_output=True,
                                                       return_logprobs=True, **image_inputs)
        ref_sum, _ = self._get_batch_logps(ref_log_probs, att_masks, prompt_lens)
        joint = JointForward(prompts, logps_sum[:n], logps_sum[n:], ref_sum[:n], ref_sum[n:],
                             output.aux_loss if "aux_loss" in output else [], -logps_mean[:n].mean())
        if self.loss_name.startswith("tdpo"):
            mask = self._response_mask(att_masks, prompt_lens)
            kl = sequence_kl(output["logits"][:, :-1], ref_output["logits"][:, :-1], mask, self.kl_chunk)
            joint.chosen_kl, joint.rejected_kl = kl[:n], kl[n:]
        return joint

    def concatenated_forward(self, model, chosen_ids, c_mask, reject_ids, r_mask, prompts: PromptInputs):
        """OpenRLHF's per-model request, answered from :meth:`policy_and_reference_forward`."""
        if model is self.ref_model:
            joint = self._joint
            if joint is not None and joint.prompts is prompts:
                return joint.ref_chosen_logps, joint.ref_rejected_logps, [], None
            return self._single_forward(model, chosen_ids, c_mask, reject_ids, r_mask, prompts)
        self._joint = joint = self.policy_and_reference_forward(chosen_ids, c_mask, reject_ids, r_mask, prompts)
        if model.training:
            self._margins.append(float((joint.chosen_logps - joint.rejected_logps).detach().mean()))
            if self.sft is not None:
                joint.nll_loss = self.mixed_nll(joint.nll_loss, self.sft_nll(model))
        return joint.chosen_logps, joint.rejected_logps, joint.aux_loss, joint.nll_loss

    def mixed_nll(self, chosen_nll: torch.Tensor, sft_nll: torch.Tensor) -> torch.Tensor:
        """The NLL term with SFT examples: theirs alone (OpenRLHF weighs it by sft_coef), or, with
        ``dpo.nll_loss_coef`` too, both weighted here (OpenRLHF's weight is then 1, openrlhf_args.nll_slot_coef)."""
        if self.chosen_nll_coef > 0:
            return self.sft_coef * sft_nll + self.chosen_nll_coef * chosen_nll
        return sft_nll

    def sft_nll(self, model) -> torch.Tensor:
        """Mean NLL per answer token of this micro-step's SFT micro-batch (the policy, with grad)."""
        ids, mask, prompts = self.sft.next_batch()
        device = next(model.parameters()).device
        image_inputs = {key: value.to(device).to(self._dtype(model)) if value.is_floating_point() else value.to(device)
                        for key, value in prompts.image_inputs.items()}
        ids, mask = ids.to(device), mask.to(device)
        log_probs = model(ids, attention_mask=mask, return_output=False, return_logprobs=True, **image_inputs)
        _, logps_mean = self._get_batch_logps(log_probs, mask, prompts.lengths)
        return -logps_mean.mean()

    def _single_forward(self, model, chosen_ids, c_mask, reject_ids, r_mask, prompts: PromptInputs):
        """One model alone: a reference asked for without (or before) its policy forward."""
        input_ids, att_masks, prompt_lens, image_inputs = self.forward_inputs(
            model, chosen_ids, c_mask, reject_ids, r_mask, prompts)
        n = chosen_ids.shape[0]
        log_probs, output = model(input_ids, attention_mask=att_masks, return_output=True, return_logprobs=True,
                                  **image_inputs)
        logps_sum, logps_mean = self._get_batch_logps(log_probs, att_masks, prompt_lens)
        aux_loss = output.aux_loss if "aux_loss" in output else []
        return logps_sum[:n], logps_sum[n:], aux_loss, -logps_mean[:n].mean()

    def forward_inputs(self, model, chosen_ids, c_mask, reject_ids, r_mask, prompts: PromptInputs):
        """(input_ids, attention_mask, prompt lengths, image inputs) of the chosen rows then the rejected rows."""
        input_ids, att_masks, prompt_lens = self.concatenated_inputs(
            chosen_ids, c_mask, reject_ids, r_mask, list(prompts.lengths))
        image_inputs = {}
        for key, value in prompts.image_inputs.items():
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
        joint = self._joint
        if joint is None or joint.chosen_kl is None or joint.chosen_logps is not chosen_logps:
            raise RuntimeError("TDPO's loss needs the KL of the policy forward that gave these log-probs; "
                               "OpenRLHF's DPOTrainer loop no longer calls concatenated_forward before loss_fn.")
        chosen_margin = chosen_logps - ref_chosen_logps
        rejected_margin = rejected_logps - ref_rejected_logps
        losses = tdpo_loss(chosen_margin, rejected_margin, joint.chosen_kl, joint.rejected_kl, self.beta,
                           self.alpha, self.loss_name)
        return losses.mean(), self.beta * chosen_margin.detach(), self.beta * rejected_margin.detach()

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        self._joint = None   # the step is over: do not hold its tensors (and their graph) until the next one
        logs_dict = dict(logs_dict or {})
        if self._margins:
            margin = self.strategy.all_reduce(sum(self._margins) / len(self._margins))
            logs_dict["logp_margin"] = margin  # policy log p(chosen) - log p(rejected)
            self._margins = []
        if self.metrics_path and self.strategy.is_rank_0() and "loss_mean" in logs_dict:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"global_step": global_step, **logs_dict}) + "\n")
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)
        if self._wandb is not None and self._tensorboard is not None and global_step % args.logger.logging_steps == 0:
            for key, value in logs_dict.items():   # OpenRLHF logged wandb only (its `elif`)
                self._tensorboard.add_scalar(f"train/{key}", value, global_step)
        if self.hf_ckpt_steps and global_step % self.hf_ckpt_steps == 0 and self.save_hf_checkpoint is not None:
            self.save_hf_checkpoint(global_step)   # every rank: ZeRO-3 gathers the weights


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
