"""One rank of `csr train-rm`: a multimodal Bradley-Terry reward model on OpenRLHF's DeepSpeed strategy.

Started by ``csr train-rm`` through torchrun, or by any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK:

    torchrun --nproc_per_node 2 -m csr_plugin.reward_model.train_main --config R.yaml [k=v ...]

OpenRLHF's RewardModelTrainer reads text-only batches and a text-only model, so the loop is here; what
it runs on is OpenRLHF's: the strategy (csr's make_strategy: CPU ranks with gloo), its DistributedSampler,
the optimizer and cosine schedule built by strategy.prepare, its checkpoint save/load.

Writes ``<out>/rm_metrics.jsonl`` (a line per optimizer step, and per epoch the held-out pairwise accuracy),
``<out>/ds_ckpt/`` every ``rm.ckpt_steps`` steps (loaded on restart, removed at the end) and ``<out>/final/``
(model.py), marked ``final/.complete``: a finished run is not redone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch

from csr_plugin.config import ConfigError, DPOConfig, LoggingConfig, Recipe, RewardModelConfig, load_recipe
from csr_plugin.training.checkpoints import COMPLETE
from csr_plugin.training.device import comm_device, make_strategy
from csr_plugin.training.openrlhf_args import DPO_NOT_READ
from csr_plugin.training.rank_cli import rank_arguments
from csr_plugin.training.tracking import logger_flags

METRICS = "rm_metrics.jsonl"


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "final" / COMPLETE).exists()


def as_dpo_config(cfg: RewardModelConfig) -> DPOConfig:
    """The DPO section with the reward model's values: the worker's OpenRLHF flags (openrlhf_args) and VLM
    loader (dpo_main.load_actor) read the same knobs, so both are reused rather than copied."""
    return dataclasses.replace(
        DPOConfig(), zero_stage=cfg.zero_stage, lr=cfg.lr, epochs=cfg.epochs, micro_batch=cfg.micro_batch,
        batch=cfg.batch, max_len=cfg.max_len, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        freeze_vision=cfg.freeze_vision, gradient_checkpointing=cfg.gradient_checkpointing, dtype=cfg.dtype,
        seed=cfg.seed, ckpt_steps=cfg.ckpt_steps)


_NOT_DPO_LOSS = "a DPO loss flag; the reward model trains on the Bradley-Terry loss with rm.margin"
_NO_LOGGER = "csr train-rm logs to rm_metrics.jsonl only, not to wandb or TensorBoard"
# Flags of the namespace the reward model's ranks build (the DPO worker's) that they do not act on:
# refused in `rm.openrlhf`. What they do act on: the strategy's (ds.* below not listed, train.*, max_norm),
# the optimizer and schedule (adam.*, lr_scheduler, lr_warmup_ratio, min_lr_ratio), save_ckpt's
# ckpt.max_num / ckpt.max_mem, and the loader's (ds.attn_implementation, ds.lora.*,
# model.gradient_checkpointing_*), read from the namespace in loader_config.
# The DPO worker's list (collate, loader, resume: shared) with the reasons that differ replaced.
RM_NOT_READ = {
    **DPO_NOT_READ,
    "ds.tensor_parallel_size": "the held-out evaluation and the final/ gather of the reward model assume data "
                               "parallelism only",
    "train.full_determinism_enable": "csr's strategy is built without it; seeds come from rm.seed",
    "eval.dataset": "the held-out pairs are rm.eval_fraction of rm.pairs",
    "eval.steps": "the held-out pairs are scored at the end of each epoch",
    "ckpt.disable_ds": "csr resumes from ds_ckpt/ (rm.ckpt_steps)",
    "ckpt.save_hf": "csr train-rm writes final/ at the end only",
    "optim": "the reward model's worker runs Adam",
    "model.beta": _NOT_DPO_LOSS, "model.ipo_enable": _NOT_DPO_LOSS, "model.label_smoothing": _NOT_DPO_LOSS,
    "model.nll_loss_coef": _NOT_DPO_LOSS,
    "model.aux_loss_coef": "the MoE auxiliary loss of OpenRLHF's DPO trainer; the reward model's loop adds none",
    "ref.model_name_or_path": "the reward model has no reference model",
    "ref.offload": "the reward model has no reference model",
    **dict.fromkeys(logger_flags(LoggingConfig(), "out"), _NO_LOGGER),
}
# Flags csr sets per run.
RM_RESERVED = {
    "model.model_name_or_path": "model.path, the backbone", "data.dataset": "rm.pairs or --pairs",
    "ckpt.output_dir": "<out>/final", "ckpt.path": "<out>/ds_ckpt", "local_rank": "the launcher",
}


def rm_flags(cfg: RewardModelConfig, model_path: str, pairs: str, out_dir: str, gpu: bool | None = None) -> dict:
    """The ranks' OpenRLHF flags: the DPO worker's, built from our named keys, with `rm.openrlhf` applied.
    ``gpu``: the machine the flags are for (None = this one)."""
    from csr_plugin.passthrough import merge
    from csr_plugin.training.openrlhf_args import _own_dpo_flags

    def build(sections: dict) -> dict:
        return _own_dpo_flags(as_dpo_config(sections["rm"]), model_path, pairs, out_dir, gpu, None)

    return merge(build({"rm": cfg}), cfg.openrlhf, "rm.openrlhf", build, {"rm": cfg}, RM_RESERVED, RM_NOT_READ,
                 worker="csr's reward model worker", runs="OpenRLHF's strategy",
                 listed="docs/reward-model.md lists the flags it acts on")


def loader_config(cfg: RewardModelConfig, args) -> DPOConfig:
    """What dpo_main.load_actor reads, with the loader's flags taken from the ranks' namespace, so that
    `rm.openrlhf` values of them (ds.attn_implementation, ds.lora.dropout, ds.lora.target_modules) load."""
    return dataclasses.replace(as_dpo_config(cfg), attn_implementation=args.ds.attn_implementation,
                               lora_dropout=args.ds.lora.dropout, lora_targets=list(args.ds.lora.target_modules))


def load_reward_backbone(model_path: str, cfg: RewardModelConfig, args, ds_config: dict, trust_remote_code: bool):
    """The VLM as csr's DPO worker loads it (vision tower frozen, LoRA, ZeRO-3 leaf modules, gradient
    checkpointing as DPO switches it on), unwrapped. ``args``: the ranks' OpenRLHF namespace."""
    from csr_plugin.training.dpo_main import load_actor

    actor = load_actor(model_path, loader_config(cfg, args), ds_config, True, trust_remote_code)
    if args.model.gradient_checkpointing_enable:
        # the transformers layers recompute in backward whenever they run in training mode, also when
        # called through the inner model as MultimodalRewardModel does
        actor.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.model.gradient_checkpointing_reentrant})
    return actor.model


def to_device(batch: dict) -> dict:
    device = comm_device()
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Metrics:
    def __init__(self, path: Path, active: bool):
        self.path, self.active = path, active

    def truncate(self, keep_until_step: int) -> None:
        """Steps after the checkpoint resumed from are trained again: their old lines go."""
        if not self.active or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip().endswith("}")]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["global_step"] <= keep_until_step))

    def write(self, row: dict) -> None:
        if self.active:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def evaluate(model, strategy, dataset, micro_batch: int, margin: float) -> dict:
    """Held-out pairwise accuracy, BT loss and reward statistics over every held-out pair exactly once.

    Rank r scores pairs r, r + world, ...; ZeRO-3's gathers need every rank in every forward, so a rank
    short of pairs scores pair 0 again and does not count it.
    """
    from csr_plugin.reward_model.data import split_rewards
    from csr_plugin.reward_model.losses import bradley_terry_loss

    world, rank = strategy.world_size, torch.distributed.get_rank()
    n = len(dataset)
    per_rank = math.ceil(n / world)
    mine = [(i, True) for i in range(rank, n, world)]
    mine += [(0, False)] * (per_rank - len(mine))
    totals = torch.zeros(5, dtype=torch.float64)   # pairs, correct, loss sum, reward sum, reward sq sum
    model.eval()
    with torch.no_grad():
        for start in range(0, per_rank, micro_batch):
            chunk = mine[start:start + micro_batch]
            batch = dataset.collate_fn([dataset[i] for i, _ in chunk])
            chosen, rejected = split_rewards(model(**to_device(batch)))
            counted = torch.tensor([c for _, c in chunk], device=chosen.device)
            chosen, rejected = chosen[counted].double(), rejected[counted].double()
            if chosen.numel():
                both = torch.cat([chosen, rejected])
                totals += torch.tensor([chosen.numel(), (chosen > rejected).sum().item(),
                                        bradley_terry_loss(chosen, rejected, margin).item() * chosen.numel(),
                                        both.sum().item(), (both ** 2).sum().item()], dtype=torch.float64)
    model.train()
    totals = strategy.all_reduce(totals, op="sum")
    pairs, correct, loss, s1, s2 = totals.tolist()
    mean = s1 / (2 * pairs)
    return {"eval_pairs": int(pairs), "eval_acc": correct / pairs, "eval_loss": loss / pairs,
            "eval_reward_mean": mean, "eval_reward_std": math.sqrt(max(s2 / (2 * pairs) - mean ** 2, 0.0))}


def save_final(strategy, engine, processor, cfg: RewardModelConfig, folder: Path, info: dict) -> None:
    """final/ from the trained engine; every rank calls it (ZeRO-3 gathers the weights on rank 0)."""
    from csr_plugin.reward_model.model import _hf_model, split_state, write_reward_model

    module = engine.module
    if cfg.zero_stage == 3:
        state = engine._consolidated_16bit_state_dict()   # full tensors on rank 0, in the training dtype
    else:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if strategy.is_rank_0():
        backbone, head = split_state(state, cfg.lora_alpha, cfg.lora_rank)
        write_reward_model(folder, _hf_model(module.backbone), processor, backbone, head, cfg.head, info)
        (folder / COMPLETE).write_text("done\n")
    torch.distributed.barrier()


def train_rm(recipe: Recipe, model_path: str, pairs: str, out_dir: str) -> None:
    from csr_plugin.reward_model.data import RewardPairs, pair_ids, split_by_id, split_rewards
    from csr_plugin.reward_model.losses import bradley_terry_loss, pairwise_accuracy
    from csr_plugin.reward_model.model import MultimodalRewardModel
    from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor
    from csr_plugin.training.openrlhf_args import as_namespace

    cfg, out = recipe.rm, Path(out_dir)
    args = as_namespace(rm_flags(cfg, model_path, pairs, out_dir))
    strategy = make_strategy(args)
    strategy.setup_distributed()
    if is_complete(out):
        strategy.print(f"{out / 'final'} is complete; nothing to do")
        return
    if cfg.batch % (cfg.micro_batch * strategy.world_size):
        # rm.nproc is checked against the recipe; the world a hostfile or outside launchers made, here
        raise ConfigError(f"`rm.batch` ({cfg.batch}) must be a multiple of rm.micro_batch x the ranks "
                          f"({cfg.micro_batch} x {strategy.world_size}).")
    processor = load_processor(model_path, recipe.model.trust_remote_code)
    base = MultimodalPreferenceDataset(pairs, processor, cfg.max_len)
    train_idx, eval_idx = split_by_id(pair_ids(base), cfg.eval_fraction)
    backbone = load_reward_backbone(model_path, cfg, args, strategy.get_ds_train_config(),
                                    recipe.model.trust_remote_code)
    torch.manual_seed(cfg.seed)   # the head's initialisation, the same on every rank
    model = MultimodalRewardModel(backbone, cfg.head)
    train_set = RewardPairs(base, train_idx, backbone.config, cfg.batch, cfg.partial)
    eval_set = RewardPairs(base, eval_idx, backbone.config) if eval_idx else None
    strategy.print(f"reward model: {len(train_idx)} training pairs -> {len(train_set)} items per epoch"
                   f"{' (cut pairs)' if cfg.partial else ''}, {len(eval_idx)} held out")
    loader = strategy.setup_dataloader(train_set, cfg.micro_batch, True, True, train_set.collate_fn)
    steps_per_epoch = len(train_set) // cfg.batch
    schedule = dict(optim="adam", muon={}, adam=vars(args.adam), lr_scheduler=args.lr_scheduler,
                    lr_warmup_ratio=args.lr_warmup_ratio, min_lr_ratio=args.min_lr_ratio, max_norm=args.max_norm,
                    scheduler_steps=cfg.epochs * steps_per_epoch)
    engine, optimizer, scheduler = strategy.prepare((model, schedule))
    partitioned = [p for p in engine.module.parameters() if hasattr(p, "ds_tensor")]
    if partitioned:
        held, total = sum(p.ds_tensor.numel() for p in partitioned), sum(p.ds_numel for p in partitioned)
        strategy.print(f"ZeRO-3: rank 0 holds {held}/{total} parameter elements ({held / total:.3f})")

    consumed = 0
    if os.path.exists(args.ckpt.path):
        load_path, states = strategy.load_ckpt(engine, args.ckpt.path)
        if load_path is not None:
            consumed = states["consumed_samples"]
            strategy.print(f"resumed the reward model from {load_path} ({consumed} items consumed)")
    out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / METRICS, strategy.is_rank_0())
    global_step = consumed // cfg.batch
    metrics.truncate(global_step)

    accumulation = strategy.accumulated_gradient
    last_eval: dict = {}
    start_epoch = global_step // steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        # a resumed epoch skips the items its finished steps trained on (a whole number of steps' worth)
        skip = (global_step % steps_per_epoch) * cfg.batch if epoch == start_epoch else 0
        loader.sampler.set_epoch(epoch, consumed_samples=skip)
        window = []
        for micro_step, batch in enumerate(loader, start=1):
            chosen, rejected = split_rewards(engine(**to_device(batch)))
            loss = bradley_terry_loss(chosen, rejected, cfg.margin or None)
            strategy.backward(loss, engine, optimizer)
            strategy.optimizer_step(optimizer, engine, scheduler)
            window.append((loss.item(), pairwise_accuracy(chosen.detach(), rejected.detach()),
                           chosen.mean().item(), rejected.mean().item()))
            if micro_step % accumulation:
                continue
            global_step += 1
            loss_mean, acc, r_chosen, r_rejected = (sum(col) / len(window) for col in zip(*window))
            window = []
            row = strategy.all_reduce({"loss": loss_mean, "acc": acc, "reward_chosen": r_chosen,
                                       "reward_rejected": r_rejected})
            metrics.write({"global_step": global_step, "epoch": epoch, **row, "lr": scheduler.get_last_lr()[0]})
            epoch_end = global_step % steps_per_epoch == 0
            if epoch_end and eval_set is not None:
                last_eval = evaluate(engine, strategy, eval_set, cfg.micro_batch, cfg.margin)
                metrics.write({"global_step": global_step, "epoch": epoch, **last_eval})
                strategy.print(f"epoch {epoch}: held-out accuracy {last_eval['eval_acc']:.3f} "
                               f"over {last_eval['eval_pairs']} pairs")
            if cfg.ckpt_steps and global_step % cfg.ckpt_steps == 0 and global_step < cfg.epochs * steps_per_epoch:
                strategy.save_ckpt(engine, args.ckpt.path, f"global_step{global_step}", args.ckpt.max_num,
                                   args.ckpt.max_mem, {"consumed_samples": global_step * cfg.batch})
    if eval_set is not None and not last_eval:   # resumed after the last step: the held-out numbers again
        last_eval = evaluate(engine, strategy, eval_set, cfg.micro_batch, cfg.margin)
    info = {"base_model": model_path, "pairs": str(pairs), "partial": cfg.partial, "margin": cfg.margin,
            "lora_merged": cfg.lora_rank > 0, "train_pairs": len(train_idx), "held_out": last_eval}
    save_final(strategy, engine, processor, cfg, out / "final", info)
    if strategy.is_rank_0():
        shutil.rmtree(args.ckpt.path, ignore_errors=True)   # it only served to resume this run, now done


def main(argv: list[str] | None = None) -> None:
    args = rank_arguments("one rank of csr train-rm", argv)
    recipe = load_recipe(args.config, args.overrides)
    train_rm(recipe, args.model or recipe.model.path, args.pairs or recipe.rm.pairs, args.out or recipe.output_dir)


if __name__ == "__main__":
    main()
