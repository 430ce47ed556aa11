"""One rank of `csr train-dpo`: OpenRLHF's DPO pipeline (strategy, Actor, DPOTrainer) with images.

Started by ``csr train-dpo`` through torchrun / the deepspeed launcher, or directly by
any launcher that sets the usual RANK / WORLD_SIZE / LOCAL_RANK variables:

    torchrun --nproc_per_node 8 -m csr_plugin.training.dpo_main --config R.yaml [k=v ...]

Resumable: a DeepSpeed checkpoint is saved every ``dpo.ckpt_steps`` optimizer steps and
loaded on restart; a finished run leaves ``<out>/final/.complete`` and is not redone.
What is saved where: checkpoints.py.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from csr_plugin.config import DPOConfig, Recipe, load_recipe
from csr_plugin.training.checkpoints import (COMPLETE, hf_checkpoint_dir, remove_ds_ckpt, save_hf,
                                             save_last_ds_ckpt)
from csr_plugin.training.device import make_strategy, zero3_load_config
from csr_plugin.training.openrlhf_args import as_namespace, dpo_flags
from csr_plugin.training.rank_cli import rank_arguments
from csr_plugin.training.tracking import check_wandb_login, wandb_env

_VISION_PARTS = ("vision_tower", "vision_model", "visual.", "image_encoder")


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "final" / COMPLETE).exists()


def _vision_tower(model):
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("vision_tower", "visual", "vision_model"):
            return module
    return None


def _language_model_linears(model) -> list[str]:
    """Names of the language model's linear layers: LoRA adapts the LM, not the vision tower or the head."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name
            and not any(part in name for part in _VISION_PARTS) and "projector" not in name]


@contextmanager
def _zero3_init_scope(ds_config: dict, setting: str):
    """Models built inside load straight into ZeRO-3 partitions (transformers' zero.Init path): each rank
    keeps its share only, a module's parameters gathered while rank 0 copies them in. transformers reads its DeepSpeed config from a global weak reference;
    it is dropped on exit, as OpenRLHF's Actor scopes it to its __init__: under it, any later
    from_pretrained (checkpoints.merge_lora, rank 0 only) would run inside zero.Init, whose collectives
    the other ranks never join (a hang)."""
    if ds_config["zero_optimization"]["stage"] != 3 or setting == "off":
        yield
        return
    from openrlhf.models.actor import _patch_zero3_weight_mapping
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    _patch_zero3_weight_mapping()
    config = HfDeepSpeedConfig(zero3_load_config(ds_config))
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config


def load_actor(path: str, cfg: DPOConfig, ds_config: dict, trainable: bool, trust_remote_code: bool = False):
    """OpenRLHF's Actor around a VLM we load ourselves (OpenRLHF's loader forces trust_remote_code=True).
    With ZeRO-3 and ``cfg.zero3_init`` auto/on the parameters are partitioned as they load."""
    from openrlhf.models import Actor
    from openrlhf.models.utils import set_z3_leaf_modules
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    with _zero3_init_scope(ds_config, cfg.zero3_init):
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                            attn_implementation=cfg.attn_implementation)
        if trainable and cfg.freeze_vision:
            for name, param in model.named_parameters():
                if any(part in name for part in _VISION_PARTS):
                    param.requires_grad = False
        if trainable and cfg.lora_rank > 0:
            # inside the scope, as OpenRLHF's Actor: PEFT's inits that read the base weights (PiSSA, OLoRA)
            # gather them only while transformers reports ZeRO-3
            from peft import LoraConfig, get_peft_model

            targets = _language_model_linears(model) if cfg.lora_targets == ["all-linear"] else cfg.lora_targets
            model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                     bias="none"))
    set_z3_leaf_modules(model, detect_hybrid=False)
    tower = _vision_tower(model)
    if tower is not None and ds_config["zero_optimization"]["stage"] == 3:
        # ZeRO-3 gathers parameters one collective per tensor; a vision tower is hundreds of small
        # tensors used once per forward. As a leaf it is gathered in one go.
        from deepspeed.utils import set_z3_leaf_modules as set_leaf

        set_leaf(model, [type(tower)])
    model.config.use_cache = False
    actor = Actor(model)
    actor.is_vlm, actor._vlm_config, actor.packing_samples = True, model.config, False
    return actor


def _held_by_this_rank(model) -> tuple[int, int]:
    """Parameter elements this rank holds, of all: ZeRO-3 partitions count their own share."""
    params = list(model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return held, sum(getattr(p, "ds_numel", p.numel()) for p in params)


def _mirror_tokenizer_fields(processor) -> None:
    """OpenRLHF's trainer reads pad/eos ids from what it calls the tokenizer: here, the processor."""
    tokenizer = getattr(processor, "tokenizer", processor)
    for name in ("pad_token_id", "eos_token_id", "pad_token", "eos_token"):
        if not hasattr(processor, name):
            setattr(processor, name, getattr(tokenizer, name))


def train_dpo(recipe: Recipe, model_path: str, pairs: str, out_dir: str) -> None:
    from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor
    from csr_plugin.training.trainer import MultimodalDPOTrainer

    cfg = recipe.dpo
    out = Path(out_dir)
    check_wandb_login(recipe.logging)
    os.environ.update(wandb_env(recipe.logging, out))   # read by wandb when OpenRLHF's trainer starts it
    args = as_namespace(dpo_flags(cfg, model_path, pairs, out_dir, logging=recipe.logging))
    strategy = make_strategy(args)
    strategy.setup_distributed()
    if is_complete(out):
        strategy.print(f"{out / 'final'} is complete; nothing to do")
        return
    processor = load_processor(model_path, recipe.model.trust_remote_code)
    _mirror_tokenizer_fields(processor)
    policy = load_actor(model_path, cfg, strategy.get_ds_train_config(), True, recipe.model.trust_remote_code)
    reference = load_actor(model_path, cfg, strategy.get_ds_eval_config(offload=args.ref.offload), False,
                           recipe.model.trust_remote_code)
    if cfg.zero_stage == 3:
        held, total = _held_by_this_rank(policy.model)
        strategy.print(f"ZeRO-3 load (dpo.zero3_init: {cfg.zero3_init}): rank 0 holds {held}/{total} parameter "
                       f"elements after loading ({held / total:.3f})")
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.model.gradient_checkpointing_reentrant})

    dataset = MultimodalPreferenceDataset(pairs, processor, cfg.max_len)
    loader = strategy.setup_dataloader(dataset, cfg.micro_batch, True, True, dataset.collate_fn)
    steps_per_epoch = len(dataset) // cfg.batch
    if steps_per_epoch < 1:
        raise ValueError(f"{len(dataset)} usable pairs in {pairs} is fewer than dpo.batch={cfg.batch}; "
                         "lower dpo.batch or add pairs.")
    schedule = dict(optim="adam", muon={}, adam=vars(args.adam),
                    lr_scheduler=cfg.lr_scheduler, lr_warmup_ratio=cfg.warmup_ratio, min_lr_ratio=args.min_lr_ratio,
                    max_norm=cfg.max_norm, scheduler_steps=math.ceil(cfg.epochs * steps_per_epoch))
    (policy, optimizer, scheduler), reference = strategy.prepare((policy, schedule), reference)
    if cfg.zero_stage == 3:
        held, total = _held_by_this_rank(policy.model.module)
        strategy.print(f"ZeRO-3: rank 0 holds {held}/{total} parameter elements ({held / total:.3f})")

    consumed = 0
    if os.path.exists(args.ckpt.path):
        load_path, states = strategy.load_ckpt(policy.model, args.ckpt.path)
        if load_path is not None:
            consumed = states["consumed_samples"]
            strategy.print(f"resumed DPO from {load_path} ({consumed} pairs consumed)")
    metrics_path = out / "dpo_metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    if strategy.is_rank_0():
        _truncate_metrics(metrics_path, consumed // cfg.batch)

    def save_hf_checkpoint(global_step: int) -> None:
        save_hf(strategy, policy, processor, cfg, model_path, hf_checkpoint_dir(out, global_step),
                recipe.model.trust_remote_code)

    sft = None
    if cfg.sft_data:
        from csr_plugin.training.sft_mix import SFTDataset, SFTStream

        sft = SFTStream(SFTDataset(cfg.sft_data, processor, cfg.max_len), cfg.micro_batch, strategy.get_rank(),
                        strategy.world_size, cfg.seed)
        # a resumed run goes on where the consumed pairs left the SFT order, not from its start
        sft.step = consumed // (cfg.micro_batch * strategy.world_size)
    trainer = MultimodalDPOTrainer(
        model=policy, ref_model=reference, strategy=strategy, tokenizer=processor, optim=optimizer,
        train_dataloader=loader, eval_dataloader=None, scheduler=scheduler, max_norm=cfg.max_norm, beta=cfg.beta,
        max_epochs=cfg.epochs, loss=cfg.loss, alpha=cfg.alpha, kl_chunk=cfg.kl_chunk, metrics_path=str(metrics_path),
        hf_ckpt_steps=cfg.hf_ckpt_steps, save_hf_checkpoint=save_hf_checkpoint, sft=sft,
        sft_coef=cfg.sft_coef, chosen_nll_coef=cfg.nll_loss_coef)
    trainer.fit(args, consumed, steps_per_epoch)
    # fit's step counter runs on across epochs: its last optimizer step is this one
    save_last_ds_ckpt(strategy, policy, args, cfg, cfg.epochs * len(loader) // strategy.accumulated_gradient)
    save_hf(strategy, policy, processor, cfg, model_path, out / "final", recipe.model.trust_remote_code)
    remove_ds_ckpt(strategy, args, cfg)


def _truncate_metrics(path: Path, keep_until_step: int) -> None:
    """Steps after the checkpoint we resume from are trained again: drop their old log lines."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("global_step", 0) <= keep_until_step))


def main(argv: list[str] | None = None) -> None:
    args = rank_arguments("one rank of csr train-dpo", argv)
    recipe = load_recipe(args.config, args.overrides)
    train_dpo(recipe, args.model or recipe.model.path, args.pairs or recipe.dpo.pairs, args.out or recipe.output_dir)


if __name__ == "__main__":
    main()
