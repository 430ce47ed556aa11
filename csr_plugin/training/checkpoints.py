"""What a DPO run leaves on disk besides its logs.

- ``final/``: the trained model, HF format with the processor; with LoRA, the adapter merged into the
  weights (``dpo.lora_merge: true``) or kept as a PEFT adapter (false). ``final/.complete`` once whole.
- ``hf_ckpt/global_step<N>/``: the same, every ``dpo.hf_ckpt_steps`` optimizer steps.
- ``ds_ckpt/``: OpenRLHF's resumable DeepSpeed checkpoint; removed at the end unless ``dpo.keep_ds_ckpt``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from csr_plugin.config import DPOConfig

COMPLETE = ".complete"


def checkpoint_dtype(model_path: str) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's ``dtype``), fp32 when it does not say."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def merge_lora(model_path: str, adapter_dir: str | Path, trust_remote_code: bool = False):
    """The base model with the adapter in ``adapter_dir`` merged into its weights.

    Merged in the base checkpoint's own dtype: a bf16 7B model needs 14 GB here, not 28, and the next
    stage loads what it loaded before. PEFT forms the update B·A in fp32 on CPU and rounds it once to
    the weights' dtype before adding it.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_path, dtype=checkpoint_dtype(model_path),
                                                       trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_hf(strategy, policy, processor, cfg: DPOConfig, model_path: str, folder: Path,
            trust_remote_code: bool = False) -> None:
    """An HF checkpoint of the policy in ``folder``; every rank calls it (ZeRO-3 gathers the weights)."""
    if strategy.is_rank_0():
        # A step trained again after a resume overwrites its checkpoint: no stale marker or adapter may stay.
        shutil.rmtree(folder, ignore_errors=True)
    strategy.save_model(policy, processor, str(folder))   # LoRA: the adapter only; ends with a barrier
    if strategy.is_rank_0():
        adapter = cfg.lora_rank > 0
        if adapter and cfg.lora_merge:
            merged = merge_lora(model_path, folder, trust_remote_code)
            for name in os.listdir(folder):
                if name.startswith("adapter_"):
                    os.remove(folder / name)
            merged.save_pretrained(folder)
            processor.save_pretrained(folder)
            adapter = False
        if not adapter:
            from csr_plugin.checkpoint_layout import to_hub_layout

            to_hub_layout(folder)  # the key layout vLLM loads; a toy model's start would keep transformers' own
        (folder / COMPLETE).write_text("done\n")
    torch.distributed.barrier()


def hf_checkpoint_dir(out_dir: str | Path, global_step: int) -> Path:
    return Path(out_dir) / "hf_ckpt" / f"global_step{global_step}"


def save_last_ds_ckpt(strategy, policy, args, cfg: DPOConfig, global_step: int) -> None:
    """With ``dpo.keep_ds_ckpt``, ds_ckpt/ ends holding the last step (saved before final/ is marked complete,
    so a kill in between cannot skip it: a complete run is never resumed)."""
    # Decided from the schedule, not the disk: every rank must agree (the save is collective), and on
    # several nodes without a shared disk each sees only its own files.
    if cfg.keep_ds_ckpt and (cfg.ckpt_steps == 0 or global_step % cfg.ckpt_steps):
        strategy.save_ckpt(policy.model, args.ckpt.path, f"global_step{global_step}", args.ckpt.max_num,
                           args.ckpt.max_mem, {"consumed_samples": global_step * args.train.batch_size})


def remove_ds_ckpt(strategy, args, cfg: DPOConfig) -> None:
    """Without ``dpo.keep_ds_ckpt``: the optimizer state only serves to resume this run, and it is done."""
    if not cfg.keep_ds_ckpt and strategy.is_rank_0():
        shutil.rmtree(args.ckpt.path, ignore_errors=True)
