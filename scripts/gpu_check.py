"""The GPU acceptance run's two stages (scripts/gpu_check.sh starts them): CSR sampling and DPO steps at
LLaVA-1.5-7B geometry with random weights, each printing one JSON line (tokens/s, peak GPU memory, pass).

Random weights, because the check must run offline from a node that holds no checkpoint: the geometry
(CLIP ViT-L/14-336 tower, 576 image tokens, a 32-layer 4096-wide LLaMA decoder, 32064-token vocabulary)
sets the memory and the speed, the weights do not. The tokenizer is a word-level one built here.

- ``sample``: csr's sentence-level search (transformers engine) with an open_clip ViT-L-14-336 (random)
  scoring every candidate sentence, bf16, on one GPU;
- ``dpo`` (under torchrun): DPO steps with LoRA on DeepSpeed ZeRO-3 over NCCL, the model built
  partitioned (zero.Init), the reference being the policy with its adapters off (LoRA DPO's usual
  reference); chosen / rejected responses are random token ids: the check is of memory, speed and that
  the adapters train, not of what they learn.

``--tiny``: the same code at toy sizes, on the CPU with gloo where there is no GPU (how it is tested
without one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

IMAGE_TOKEN = "<image>"


def geometry(tiny: bool) -> dict:
    if tiny:
        return dict(vocab=512, hidden=64, layers=2, heads=2, intermediate=128, vision_hidden=32, vision_layers=2,
                    vision_heads=2, vision_intermediate=64, image=32, patch=8, clip="tiny", lora_rank=8)
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B (LLaMA-2 geometry) and CLIP ViT-L/14 at 336 px
    return dict(vocab=32064, hidden=4096, layers=32, heads=32, intermediate=11008, vision_hidden=1024,
                vision_layers=24, vision_heads=16, vision_intermediate=4096, image=336, patch=14,
                clip="ViT-L-14-336", lora_rank=128)


def build_processor(g: dict):
    """A LLaVA-1.5 processor (336 px CLIP preprocessing, 576 image tokens) over a word-level tokenizer of
    g["vocab"] entries: the special tokens, punctuation (so sentences can end) and synthetic words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from csr_plugin.toy.tiny_models import CHAT_TEMPLATE, SPECIAL_TOKENS

    words = SPECIAL_TOKENS + [".", "!", "?", ",", "USER:", "ASSISTANT:", "Describe", "the", "image"]
    words += [f"w{i}" for i in range(g["vocab"] - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=4096)
    side = g["image"]
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=g["patch"],
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


def llava_config(g: dict, processor):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=g["vision_hidden"], intermediate_size=g["vision_intermediate"],
                              num_hidden_layers=g["vision_layers"], num_attention_heads=g["vision_heads"],
                              image_size=g["image"], patch_size=g["patch"], projection_dim=768)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=g["hidden"], intermediate_size=g["intermediate"],
                       num_hidden_layers=g["layers"], num_attention_heads=g["heads"], num_key_value_heads=g["heads"],
                       max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                       image_seq_length=(g["image"] // g["patch"]) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def attention_choice() -> str:
    """What a recipe asking for flash_attention_2 gets on this install (csr_plugin/accelerator.py)."""
    from csr_plugin.accelerator import attention, flash_attn_kernels

    if flash_attn_kernels():
        try:
            import flash_attn_2_cuda  # noqa: F401 - present is not enough: it must load with this torch
        except ImportError as exc:
            print(f"flash-attn kernels present but fail to load ({exc}): sdpa", file=sys.stderr)
            return "sdpa"
    return attention("flash_attention_2", "gpu_check")


def random_images(folder: Path, count: int, size: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        path = folder / f"image_{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def peak_gib(device: torch.device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else 0.0


def stage_sample(args, g: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import LlavaForConditionalGeneration

    from csr_plugin.config import ClipConfig, CurationConfig, RewardConfig, SearchConfig
    from csr_plugin.reward.clip_relevance import ClipRelevance
    from csr_plugin.reward.source import ClipVisual
    from csr_plugin.sampling.local import search_prompts
    from csr_plugin.sampling.prompts import PromptRecord
    from csr_plugin.sampling.search import SentenceBeamSearch
    from csr_plugin.sampling.transformers_engine import TransformersEngine

    processor = build_processor(g)
    config = llava_config(g, processor)
    config.text_config._attn_implementation = config._attn_implementation = args.attention
    started = time.monotonic()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # built in bf16 on the GPU directly: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    built = time.monotonic() - started
    if g["clip"] == "tiny":
        import open_clip

        from csr_plugin.toy.tiny_models import tiny_clip_config

        clip_json = Path(args.work) / "tiny-clip.json"
        clip_json.write_text(json.dumps(tiny_clip_config()))
        open_clip.add_model_config(clip_json)
    clip = ClipRelevance(ClipConfig(model="tiny-clip" if g["clip"] == "tiny" else g["clip"], pretrained=None,
                                    device=str(device)))
    search_cfg = SearchConfig(beam_width=2, keep_top=1, keep_bottom=1, candidates=4, max_sentences=2,
                              max_new_tokens=args.max_new_tokens, batch_prompts=args.prompts, seed=0)
    engine = TransformersEngine(model, processor, search_cfg)
    search = SentenceBeamSearch(engine, ClipVisual(clip), search_cfg, RewardConfig(), CurationConfig())
    images = random_images(Path(args.work) / "images", args.prompts, g["image"])
    prompts = [PromptRecord(f"p{i}", path, "Describe the image.") for i, path in enumerate(images)]
    search_prompts(search, engine, prompts[:1])   # warm-up: kernels, allocator; not timed
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.monotonic()
    trees, errors = search_prompts(search, engine, prompts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - started
    tokens = sum(len(n["token_ids"]) for tree in trees for n in tree["nodes"] if n["parent"] is not None)
    ok = len(trees) == len(prompts) and not errors and tokens > 0
    return {"stage": "sample", "pass": ok, "prompts": len(prompts), "trees": len(trees), "errors": errors[:2],
            "generated_tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "peak_gpu_gib": peak_gib(device), "build_seconds": round(built, 1), "attention": args.attention}


def stage_dpo(args, g: dict, device: torch.device, dtype: torch.dtype) -> dict:
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    bf16 = dtype == torch.bfloat16
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        # torch's AdamW: no FusedAdam to compile (no nvcc needed on the node)
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              # gloo (the --tiny CPU run) needs the sequential gather (training/device.py)
                              "stage3_allgather_sequential": device.type != "cuda"},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    processor = build_processor(g)
    config = llava_config(g, processor)
    config.text_config._attn_implementation = config._attn_implementation = args.attention
    started = time.monotonic()
    torch.manual_seed(0)
    # built partitioned, as transformers does under ZeRO-3 (its weight init gathers each module)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    zero3 = HfDeepSpeedConfig(ds_config)  # noqa: F841 - alive while the model is built
    model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    del zero3
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = get_peft_model(model, LoraConfig(r=g["lora_rank"], lora_alpha=2 * g["lora_rank"], lora_dropout=0.0,
                                             target_modules=targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    built = time.monotonic() - started

    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (g["image"], g["image"], 3), dtype=torch.uint8).numpy())
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                            {"type": "text", "text": "Describe the image."}]}],
                                           add_generation_prompt=True)
    encoded = processor(images=[image], text=[prompt], return_tensors="pt")
    prompt_ids, pixels = encoded["input_ids"][0], encoded["pixel_values"].to(device, dtype)
    generator = torch.Generator().manual_seed(1 + rank)
    low = len(processor.tokenizer) // 2   # synthetic words: never a special or image token

    def response_logps(ids: torch.Tensor, response: int) -> torch.Tensor:
        logits = engine(input_ids=ids.unsqueeze(0), pixel_values=pixels).logits[0, :-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)
        return logps[-response:].sum()

    losses, started, tokens = [], None, 0
    for step in range(args.dpo_steps + 1):   # step 0: warm-up, not timed
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.monotonic()
        pair = [torch.cat([prompt_ids, torch.randint(low, len(processor.tokenizer), (args.response_tokens,),
                                                     generator=generator)]).to(device) for _ in range(2)]
        with torch.no_grad(), engine.module.disable_adapter():
            ref = [response_logps(ids, args.response_tokens) for ids in pair]
        policy = [response_logps(ids, args.response_tokens) for ids in pair]
        # DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * (chosen margin - rejected margin))
        loss = -F.logsigmoid(0.1 * ((policy[0] - ref[0]) - (policy[1] - ref[1])))
        engine.backward(loss)
        engine.step()
        if step:
            losses.append(loss.item())
            tokens += 4 * len(pair[0])   # two sequences, each through the reference and the policy
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - started
    lora_b = [p for n, p in engine.module.named_parameters() if "lora_B" in n]
    with deepspeed.zero.GatheredParameters(lora_b):
        moved = sum(float(p.detach().abs().sum()) for p in lora_b)   # LoRA B starts at zero
    world = dist.get_world_size()
    result = {"stage": "dpo", "pass": bool(all(map(lambda x: x == x and abs(x) < 1e4, losses)) and moved > 0),
              "world_size": world, "backend": backend, "zero_stage": 3, "lora_rank": g["lora_rank"],
              "steps": len(losses), "losses": [round(x, 4) for x in losses], "lora_b_abs_sum": moved,
              "seconds": round(seconds, 1), "tokens_per_s": round(world * tokens / seconds, 1),
              "sequence_tokens": len(pair[0]), "peak_gpu_gib": peak_gib(device), "build_seconds": round(built, 1),
              "attention": args.attention}
    dist.barrier()
    return result if rank == 0 else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["sample", "dpo"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU where there is no GPU)")
    parser.add_argument("--work", default="runs/gpu_check", help="scratch folder")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dpo-steps", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=64)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        print(json.dumps({"stage": args.stage, "pass": False, "error": "torch sees no GPU (run `csr doctor`)"}))
        return 1
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    args.attention = attention_choice() if gpu else "sdpa"
    g = geometry(args.tiny)
    result = (stage_sample if args.stage == "sample" else stage_dpo)(args, g, device, dtype)
    if result:
        print("GPU_CHECK " + json.dumps(result), flush=True)
        return 0 if result["pass"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
