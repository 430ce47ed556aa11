"""Seconds per DPO optimizer step: our multimodal trainer vs OpenRLHF's own text-only DPO.

Same tiny language model (the LM inside the tiny LLaVA, saved as a plain LlamaForCausalLM
for the text-only side), same token counts (the text prompt is padded with words to the
multimodal prompt's length, image tokens included), same DeepSpeed strategy, ZeRO stage,
batch sizes and rank count, one launch. The only extra work on the multimodal side is
the image path: the vision tower, the projector and merging the image features.

    python benchmarks/dpo_step.py [--nproc 2] [--pairs 32] [--zero-stage 3]

It re-launches itself under torchrun; the median step time (first step excluded) is used.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def build_inputs(root: Path, vlm: Path, n_pairs: int) -> None:
    """root/lm (the text-only LM), root/text_pairs.jsonl and root/pairs.jsonl, with matching token counts."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaForCausalLM

    lm_dir = root / "lm"
    processor = AutoProcessor.from_pretrained(vlm)
    tokenizer = processor.tokenizer
    if not (lm_dir / "config.json").exists():
        vlm_model = AutoModelForImageTextToText.from_pretrained(vlm)
        lm = LlamaForCausalLM(vlm_model.config.text_config)
        lm.model.load_state_dict(vlm_model.model.language_model.state_dict())
        lm.lm_head.load_state_dict(vlm_model.lm_head.state_dict())
        lm.save_pretrained(lm_dir)
        tokenizer.save_pretrained(lm_dir)
    question = "Describe the image in detail."
    chosen, rejected = "There is a red circle next to a small blue square.", "There is a green star on the left."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    mm_prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n_prompt = len(processor(images=Image.new("RGB", (32, 32)), text=mm_prompt)["input_ids"][0])
    text_prompt = mm_prompt.replace("<image>", "")
    while len(tokenizer(text_prompt, add_special_tokens=False)["input_ids"]) < n_prompt:
        text_prompt = " image" + text_prompt  # words in place of the image tokens
    text_pairs, lines = [], []
    for i in range(n_pairs):
        image = root / f"{i}.png"
        Image.new("RGB", (32, 32), (i * 7 % 255, 90, 160)).save(image)
        text_pairs.append({"prompt": text_prompt, "chosen": " " + chosen, "rejected": " " + rejected})
        lines.append({"id": str(i), "images": [str(image)], "prompt": messages,
                      "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                      "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "text_pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in text_pairs))


def time_steps(strategy, trainer, args, steps_per_epoch: int) -> list[float]:
    stamps = []
    original = strategy.optimizer_step

    def timed(*a, **k):
        out = original(*a, **k)
        stamps.append(time.perf_counter())
        return out
    strategy.optimizer_step = timed
    start = time.perf_counter()
    trainer.fit(args, 0, steps_per_epoch)
    strategy.optimizer_step = original
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    accumulation = strategy.accumulated_gradient
    per_step = [sum(times[i:i + accumulation]) for i in range(0, len(times), accumulation)]
    return per_step[1:]  # the first step pays one-off allocation costs


def worker(opts) -> None:
    import datasets
    import torch

    from csr_plugin.training.device import make_strategy  # first: it prepares openrlhf's import on CPU
    from openrlhf.models import Actor
    from openrlhf.trainer.dpo_trainer import DPOTrainer
    from openrlhf.datasets import RewardDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csr_plugin.config import DPOConfig
    from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor
    from csr_plugin.training.dpo_main import _mirror_tokenizer_fields, load_actor
    from csr_plugin.training.openrlhf_args import as_namespace, dpo_flags
    from csr_plugin.training.trainer import MultimodalDPOTrainer

    root = Path(opts.work)
    lm_dir, mm_pairs = root / "lm", root / "pairs.jsonl"
    text_pairs = [json.loads(line) for line in (root / "text_pairs.jsonl").read_text().splitlines()]
    cfg = DPOConfig(batch=opts.batch, micro_batch=1, zero_stage=opts.zero_stage, epochs=1, lr=1e-5,
                    ckpt_steps=0, freeze_vision=True)
    results = {}
    for mode in ("text", "multimodal"):
        flags = dpo_flags(cfg, str(opts.vlm if mode == "multimodal" else lm_dir), str(mm_pairs), str(root / mode))
        flags.update({"data.prompt_key": "prompt", "data.chosen_key": "chosen", "data.rejected_key": "rejected",
                      "data.apply_chat_template": False, "data.tokenizer_chat_template": None})
        args = as_namespace(flags)
        strategy = make_strategy(args)
        strategy.setup_distributed()
        schedule = dict(optim="adam", adam=vars(args.adam), lr_scheduler="constant", lr_warmup_ratio=0.0,
                        min_lr_ratio=0.1, max_norm=1.0, scheduler_steps=100)
        if mode == "text":
            def text_actor():
                model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32, attn_implementation="sdpa")
                model.config.use_cache = False
                actor = Actor(model)
                actor.packing_samples = False
                return actor
            tokenizer = AutoTokenizer.from_pretrained(lm_dir)
            tokenizer.padding_side = "right"
            policy, reference = text_actor(), text_actor()
            dataset = RewardDataset(datasets.Dataset.from_list(text_pairs), tokenizer, cfg.max_len, strategy,
                                    is_dpo=True, num_processors=1)
            trainer_cls, trainer_kwargs = DPOTrainer, {}
        else:
            tokenizer = load_processor(str(opts.vlm))
            _mirror_tokenizer_fields(tokenizer)
            policy = load_actor(str(opts.vlm), cfg, strategy.get_ds_train_config(), True)
            reference = load_actor(str(opts.vlm), cfg, strategy.get_ds_eval_config(), False)
            dataset = MultimodalPreferenceDataset(str(mm_pairs), tokenizer, cfg.max_len)
            trainer_cls, trainer_kwargs = MultimodalDPOTrainer, {"loss": "dpo"}
        loader = strategy.setup_dataloader(dataset, 1, True, True, dataset.collate_fn)
        (policy, optimizer, scheduler), reference = strategy.prepare((policy, schedule), reference)
        trainer = trainer_cls(model=policy, ref_model=reference, strategy=strategy, tokenizer=tokenizer,
                              optim=optimizer, train_dataloader=loader, eval_dataloader=None, scheduler=scheduler,
                              max_norm=1.0, beta=0.1, max_epochs=1, **trainer_kwargs)
        steps = time_steps(strategy, trainer, args, len(dataset) // cfg.batch)
        results[mode] = statistics.median(steps)
        tokens = int(next(iter(loader))[1].sum())
        strategy.print(f"{mode}: chosen sequence length {tokens} tokens (image tokens included)")
    if torch.distributed.get_rank() == 0:
        text, mm = results["text"], results["multimodal"]
        print(f"\nDPO optimizer step, {torch.distributed.get_world_size()} CPU ranks, ZeRO-{opts.zero_stage}, "
              f"batch {opts.batch}, {opts.pairs} pairs, median of {opts.pairs // opts.batch - 1} steps")
        print(f"OpenRLHF text-only DPO : {text * 1000:8.1f} ms/step")
        print(f"csr multimodal DPO     : {mm * 1000:8.1f} ms/step")
        print(f"ratio multimodal/text  : {mm / text:.2f}x   (target <= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--vlm", default=".cache/tiny/vlm")
    parser.add_argument("--work", default=".cache/bench-dpo")
    opts = parser.parse_args()
    if "RANK" in os.environ:
        worker(opts)
        return
    from csr_plugin.toy.quickstart import prepare_tiny_assets

    prepare_tiny_assets(Path(opts.vlm).parent)
    Path(opts.work).mkdir(parents=True, exist_ok=True)
    build_inputs(Path(opts.work), Path(opts.vlm), opts.pairs)
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // opts.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={opts.nproc}", "--standalone",
           __file__, *sys.argv[1:]]
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
