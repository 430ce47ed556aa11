"""Our `dpo:` recipe section as OpenRLHF's own dotted train_dpo flags.

OpenRLHF's strategy and trainer read a hierarchical namespace built from these
flags (``openrlhf.utils.config.hierarchize``); building the same flags here keeps
every knob traceable to the OpenRLHF option it sets.
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

from csr_plugin.config import DPOConfig, LoggingConfig
from csr_plugin.accelerator import dtype_name
from csr_plugin.passthrough import merge
from csr_plugin.training.device import on_gpu
from csr_plugin.training.tracking import logger_flags


def param_dtype(cfg: DPOConfig, gpu: bool | None = None) -> str:
    """bf16 on GPU, fp32 on CPU (OpenRLHF's bf16/fp16 switches both off for fp32; its CLI offers no fp32)."""
    if cfg.dtype == "auto":
        return {"bfloat16": "bf16", "float32": "fp32"}[dtype_name("auto", on_gpu() if gpu is None else gpu)]
    return cfg.dtype


# Flags of the namespace our DPO worker builds that it does not act on: refused in `dpo.openrlhf`.
DPO_NOT_READ = {
    "ds.packing_samples": "csr's multimodal collate pads pairs; it does not pack them",
    "ds.ring_attn_size": "ring attention needs packed samples",
    "ds.load_in_4bit": "csr's VLM loader does not quantize",
    "ds.use_liger_kernel": "csr's VLM loader does not use Liger kernels",
    "train.full_determinism_enable": "csr's strategy is built without it; seeds come from dpo.seed",
    "eval.dataset": "csr's DPO loop has no eval set; it trains on dpo.pairs",
    "eval.steps": "csr's DPO loop has no eval set",
    "ckpt.disable_ds": "csr resumes from ds_ckpt/ (dpo.ckpt_steps, dpo.keep_ds_ckpt)",
    "ckpt.load_enable": "csr always resumes an interrupted run",
    "optim": "csr's DPO worker runs Adam",
}
# Flags csr sets per run: the iterate, the pairs and the output folder of this iteration.
DPO_RESERVED = {
    "model.model_name_or_path": "the policy of this iteration", "ref.model_name_or_path": "the policy of this "
    "iteration", "data.dataset": "dpo.pairs, or the pairs of this iteration", "ckpt.output_dir": "<output>/final",
    "ckpt.path": "<output>/ds_ckpt", "ckpt.save_hf": "dpo.hf_ckpt_steps", "local_rank": "the launcher",
    "logger.": "the recipe's logging: section",
}


def nll_slot_coef(cfg: DPOConfig) -> float:
    """OpenRLHF's ``--model.nll_loss_coef``: the weight its loop puts on the NLL the trainer returns.

    Chosen responses alone: ``nll_loss_coef``; SFT examples alone: ``sft_coef`` (the trainer returns their
    NLL in that slot); both: 1, the trainer returning the weighted sum of the two (trainer.py)."""
    if not cfg.sft_data:
        return cfg.nll_loss_coef
    return 1.0 if cfg.nll_loss_coef > 0 else cfg.sft_coef


def dpo_flags(cfg: DPOConfig, model_path: str, pairs: str, out_dir: str, gpu: bool | None = None,
              logging: LoggingConfig | None = None) -> dict:
    """Our named keys' flags with `dpo.openrlhf` applied. ``gpu``: the machine the flags are for (None = this
    one); ``logging``: the recipe's section (None = off)."""
    def build(sections: dict) -> dict:
        return _own_dpo_flags(sections["dpo"], model_path, pairs, out_dir, gpu, logging)

    return merge(build({"dpo": cfg}), cfg.openrlhf, "dpo.openrlhf", build, {"dpo": cfg}, DPO_RESERVED,
                 DPO_NOT_READ)


def _own_dpo_flags(cfg: DPOConfig, model_path: str, pairs: str, out_dir: str, gpu: bool | None,
                   logging: LoggingConfig | None) -> dict:
    out = Path(out_dir)
    return {
        "model.model_name_or_path": model_path, "ref.model_name_or_path": model_path,
        "data.dataset": pairs, "data.max_len": cfg.max_len,
        "ckpt.output_dir": str(out / "final"), "ckpt.path": str(out / "ds_ckpt"),
        "ckpt.save_steps": cfg.ckpt_steps if cfg.ckpt_steps > 0 else -1, "ckpt.load_enable": True,
        # HF checkpoints (dpo.hf_ckpt_steps) are ours, not OpenRLHF's save_hf: it writes them into ckpt.path,
        # where rotating the ZeRO checkpoints (ckpt.max_num) deletes them, and only at ckpt.save_steps.
        "ckpt.save_hf": False, "ckpt.disable_ds": False, "ckpt.max_num": 1, "ckpt.max_mem": int(1e8),
        "eval.steps": -1, "eval.dataset": None,
        "train.micro_batch_size": cfg.micro_batch, "train.batch_size": cfg.batch, "train.max_epochs": cfg.epochs,
        "train.seed": cfg.seed, "train.full_determinism_enable": False,
        "ds.zero_stage": cfg.zero_stage, "ds.param_dtype": param_dtype(cfg, gpu), "ds.attn_implementation":
            cfg.attn_implementation, "ds.use_universal_ckpt": False, "ds.deepcompile": False, "ds.zpg": 1,
        "ds.adam_offload": False, "ds.grad_accum_dtype": None, "ds.overlap_comm": False,
        "ds.tensor_parallel_size": 1, "ds.ring_attn_size": 1, "ds.packing_samples": False,
        "ds.load_in_4bit": False, "ds.use_liger_kernel": False,
        "ds.lora.rank": cfg.lora_rank, "ds.lora.alpha": cfg.lora_alpha, "ds.lora.dropout": cfg.lora_dropout,
        "ds.lora.target_modules": cfg.lora_targets,
        "model.gradient_checkpointing_enable": cfg.gradient_checkpointing,
        "model.gradient_checkpointing_reentrant": False,
        "model.beta": cfg.beta, "model.ipo_enable": cfg.loss == "ipo", "model.label_smoothing": cfg.label_smoothing,
        "model.aux_loss_coef": 0.0, "model.nll_loss_coef": nll_slot_coef(cfg),
        "optim": "adam", "adam.lr": cfg.lr, "adam.betas": (0.9, 0.95), "adam.eps": 1e-8,
        "adam.weight_decay": cfg.weight_decay, "lr_scheduler": cfg.lr_scheduler, "lr_warmup_ratio": cfg.warmup_ratio,
        "min_lr_ratio": 0.1, "max_norm": cfg.max_norm,
        "ref.offload": False, "local_rank": -1,
        **logger_flags(logging or LoggingConfig(), out),
    }


def as_namespace(flags: dict):
    from openrlhf.utils.config import hierarchize

    return hierarchize(Namespace(**flags))
