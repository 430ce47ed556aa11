"""Train the toy world's tiny CLIP (contrastive) and tiny LLaVA (SFT) on CPU, deterministically.

Both are built with the real builders (open_clip from a model-config JSON; transformers'
LlavaForConditionalGeneration) and saved in the standard formats, so every later stage
loads them exactly as it would load ViT-L/14-336 and LLaVA-1.5-7B.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from csr_plugin.checkpoint_layout import to_hub_layout
from csr_plugin.toy import world
from csr_plugin.toy.tiny_models import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

CLIP_NAME = "toy-clip"
# change it to rebuild cached CLIPs
CLIP_RECIPE = "object-centric soft targets, contrast texts, own split, paired negatives, 50-step warm-up (2026-12-06)"
# Without a warm-up, AdamW's first steps at the full rate collapsed the image tower on some seeds (every image
# embedded alike, the loss flat from step 10): seeds 5 and 6 told a present kind from an absent one in 61% and
# 45% of 100 scenes after 600 steps; with 50 warm-up steps 100% of both by step 100
# (docs/results.md, "Today's recipe on this machine").
CLIP_WARMUP = 50
# A toy CLIP is used only if it tells a shape's kind from an absent one in this share of held-out scenes:
# a blind CLIP rewards at random, and CSR then teaches hallucination (both seeds above: CHAIR_i up in iteration 1).
CLIP_MIN_SIGHT = 0.9
VLM_RECIPE = "LLaVA on the toy CLIP's frozen image tower, all its tokens; SFT pairs together 97% (2026-12-02)"


def clip_config() -> dict:
    return {"embed_dim": 64,
            "vision_cfg": {"image_size": world.IMAGE_SIZE, "layers": 3, "width": 96, "head_width": 32,
                           "patch_size": 8},
            "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 3}}


# How well a sentence fits an image, as the contrastive targets weigh it. CLIP models trained on web
# captions are noun-centric: they tell which objects are shown far better than which colour or place
# each has. CHAIR measures objects too, so the toy CLIP is taught the same priority: the right kind
# with a wrong attribute still fits partly, a kind that is absent does not fit at all.
FIT_EXACT, FIT_ONE_ATTRIBUTE_WRONG, FIT_KIND_ONLY = 1.0, 0.6, 0.3


def _parse(sentence: str) -> tuple:
    """(kind, colour, quadrant) named by a sentence of the world's grammar; None where absent."""
    words = sentence.rstrip(".").split()
    kind = next((w for w in words if w in world.KINDS), None)
    colour = next((w for w in words if w in world.COLOURS), None)
    quadrant = next((q for q in world.QUADRANTS if sentence.endswith(f"at the {q}.")), None)
    return kind, colour, quadrant


def _fit(parsed: tuple, scene: world.Scene) -> float:
    kind, colour, quadrant = parsed
    best = 0.0
    for shape in scene.shapes:
        if shape.kind == kind:
            wrong = (colour != shape.colour) + (quadrant != shape.quadrant)
            best = max(best, (FIT_EXACT, FIT_ONE_ATTRIBUTE_WRONG, FIT_KIND_ONLY)[wrong])
    return best


def sentence_fit(sentence: str, scene: world.Scene) -> float:
    return _fit(_parse(sentence), scene)


def contrast_texts(scene: world.Scene, rng: random.Random) -> list[str]:
    """Texts shown beside the true sentences for ``scene``: a hallucination that differs from a true
    sentence in its kind only, the true kind with other attributes, and a sentence naming no object.

    Plain in-batch contrast never shows CLIP such text, so an untrained direction decides its score:
    a garbled sampled sentence such as "There is a at the top left." scored above the true ones and
    the search chose it, and colour, the easiest cue, outweighed the object.
    """
    shape = rng.choice(scene.shapes)
    absent_kinds = [k for k in world.KINDS if k not in scene.objects]
    # half the time the hard negative: the kind the world pairs with this one (circle <-> square ...),
    # which the VLM's prior names; random absent kinds alone left circle and square indistinguishable
    paired = world.PAIRED.get(shape.kind)
    absent = paired if paired in absent_kinds and rng.random() < 0.5 else rng.choice(absent_kinds)
    other_colour = rng.choice([c for c in world.COLOURS if c != shape.colour])
    other_place = rng.choice([q for q in world.QUADRANTS if q != shape.quadrant])
    return [world.Shape(absent, shape.colour, shape.quadrant).sentence(),
            world.Shape(shape.kind, other_colour, rng.choice([shape.quadrant, other_place])).sentence(),
            rng.choice([f"There is a {shape.colour} at the {shape.quadrant}.", f"There is a {shape.quadrant}.",
                        f"There is a {shape.colour} {shape.colour} at the {shape.quadrant}.",
                        f"There is a at the {shape.quadrant}."])]


def train_clip(scenes: list[world.Scene], out_dir: Path, steps: int, seed: int, batch: int = 64,
               probe: list[world.Scene] | None = None, attempts: int = 3) -> tuple[Path, Path]:
    """Contrastive training with soft targets: each image against its sentences and contrast texts.

    With ``probe`` scenes the CLIP must tell a present kind from an absent one in CLIP_MIN_SIGHT of them
    (``kind_sight``, written to ``sight.json``); a CLIP that does not is trained again from another
    initialization, said on the terminal, and after ``attempts`` the build stops with the figures."""
    import open_clip

    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / f"{CLIP_NAME}.json"
    config_path.write_text(json.dumps(clip_config(), indent=2))
    open_clip.add_model_config(config_path)
    weights = out_dir / f"{CLIP_NAME}.pt"
    sights = []
    for attempt in range(attempts if probe else 1):
        model, preprocess, tokenizer = _train_clip_once(scenes, steps, seed + 1000 * attempt, batch)
        if not probe:
            break
        sights.append(kind_sight(model, preprocess, tokenizer, probe))
        if sights[-1] >= CLIP_MIN_SIGHT:
            break
        print(f"toy CLIP (seed {seed}, init {attempt + 1} of {attempts}) tells a present kind from an absent one in "
              f"{sights[-1]:.0%} of {len(probe)} held-out scenes (needs {CLIP_MIN_SIGHT:.0%}): training again from "
              "another initialization", flush=True)
    else:
        raise RuntimeError(f"toy CLIP for seed {seed}: after {attempts} initializations it tells a present kind from "
                           f"an absent one in {', '.join(f'{s:.0%}' for s in sights)} of {len(probe)} held-out scenes "
                           f"(needs {CLIP_MIN_SIGHT:.0%}); CSR with a blind CLIP teaches hallucination. Try another "
                           "--seed, and report it.")
    torch.save(model.state_dict(), weights)
    if sights:
        (out_dir / "sight.json").write_text(json.dumps({"kind_sight": sights[-1], "scenes": len(probe),
                                                        "initializations": len(sights)}))
    return config_path, weights


@torch.no_grad()
def kind_sight(model, preprocess, tokenizer, scenes: list[world.Scene]) -> float:
    """Share of ``scenes`` whose first shape's true sentence the CLIP scores above the same sentence with an
    absent kind (the world's paired kind when absent, the hard case): 0.5 is blind."""
    model.eval()
    true, swapped = [], []
    for scene in scenes:
        shape = scene.shapes[0]
        absent = [k for k in world.KINDS if k not in scene.objects]
        kind = world.PAIRED.get(shape.kind) if world.PAIRED.get(shape.kind) in absent else absent[0]
        true.append(shape.sentence())
        swapped.append(world.Shape(kind, shape.colour, shape.quadrant).sentence())
    images = model.encode_image(torch.stack([preprocess(s.draw()) for s in scenes]), normalize=True)
    fit = lambda texts: (images * model.encode_text(tokenizer(texts), normalize=True)).sum(-1)  # noqa: E731
    return (fit(true) > fit(swapped)).float().mean().item()


def _train_clip_once(scenes: list[world.Scene], steps: int, seed: int, batch: int):
    import open_clip

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(CLIP_NAME)
    images = torch.stack([preprocess(s.draw()) for s in scenes])
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / CLIP_WARMUP) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    model.train()
    for _ in tqdm(range(steps), desc="toy CLIP", unit="step"):
        index = rng.sample(range(len(scenes)), batch)
        texts = [rng.choice(scenes[i].caption_sentences()) for i in index]
        texts += [text for i in index for text in contrast_texts(scenes[i], rng)]
        image_emb = model.encode_image(images[index], normalize=True)
        text_emb = model.encode_text(tokenizer(texts), normalize=True)
        logits = model.logit_scale.exp() * image_emb @ text_emb.T          # [image, text]
        parsed = [_parse(t) for t in texts]
        fits = torch.tensor([[_fit(p, scenes[j]) for p in parsed] for j in index])
        # image -> text over every text; text -> image for the texts that fit some image of the batch
        fitting = fits.sum(0) > 0
        loss = (F.cross_entropy(logits, fits / fits.sum(1, keepdim=True))
                + F.cross_entropy(logits.T[fitting], (fits.T / fits.T.sum(1, keepdim=True).clamp_min(1e-9))[fitting])) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model, preprocess, tokenizer


def clip_vision_tower(clip_dir: Path):
    """The toy CLIP's image tower as a transformers CLIPVisionModel: (config, state dict).

    LLaVA puts a pretrained CLIP's image tower in front of its language model, and CSR scores
    sentences with a CLIP of the same family; the toy VLM does the same, so it sees what the
    CLIP sees and its hallucinations come from the language prior, as in the paper."""
    from transformers import CLIPVisionConfig

    cfg = json.loads((clip_dir / f"{CLIP_NAME}.json").read_text())["vision_cfg"]
    width, layers, patch = cfg["width"], cfg["layers"], cfg["patch_size"]
    # open_clip's blocks use nn.GELU (exact) and nn.LayerNorm's default eps
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=width // cfg["head_width"], image_size=cfg["image_size"],
                              patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5)
    clip = {k[len("visual."):]: v for k, v in torch.load(clip_dir / f"{CLIP_NAME}.pt", weights_only=True).items()
            if k.startswith("visual.")}
    state = {"embeddings.patch_embedding.weight": clip["conv1.weight"],
             "embeddings.class_embedding": clip["class_embedding"],
             "embeddings.position_embedding.weight": clip["positional_embedding"],
             "pre_layrnorm.weight": clip["ln_pre.weight"], "pre_layrnorm.bias": clip["ln_pre.bias"],
             "post_layernorm.weight": clip["ln_post.weight"], "post_layernorm.bias": clip["ln_post.bias"]}
    for i in range(layers):
        block, layer = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for part, tensor in zip("qkv", clip[block + "attn.in_proj_weight"].chunk(3)):
            state[f"{layer}self_attn.{part}_proj.weight"] = tensor
        for part, tensor in zip("qkv", clip[block + "attn.in_proj_bias"].chunk(3)):
            state[f"{layer}self_attn.{part}_proj.bias"] = tensor
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                state[f"{layer}{ours}.{kind}"] = clip[f"{block}{theirs}.{kind}"]
    return config, {k: v.contiguous() for k, v in state.items()}


def build_vlm(out_dir: Path, scenes: list[world.Scene], seed: int, clip_dir: Path):
    """A fresh tiny LLaVA with a tokenizer trained on the world's text; (model, processor).

    Its image tower is the toy CLIP's in ``clip_dir``, all its tokens, the class token included (that
    is the one the CLIP was trained to fill). With a tower of its own trained from scratch alongside
    the language model, the VLM saw unevenly (object recall 0.39-0.89 over five seeds) and confused kinds, so
    its hallucinations were not the language prior's that CSR targets."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer(world.corpus(scenes[:2000]), vocab_size=320)
    torch.manual_seed(seed)
    vision, tower = clip_vision_tower(clip_dir)
    patch, strategy = vision.patch_size, "full"
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    tokens = (world.IMAGE_SIZE // patch) ** 2 + 1   # strategy "full" keeps the class token
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=tokens, vision_feature_layer=-1,
                         vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE},
                                           crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1)
    return model, processor


def sft_examples(scenes: list[world.Scene], seed: int) -> list[tuple[int, str, str]]:
    """(scene index, question, answer): a caption and two yes/no probes per scene."""
    rng = random.Random(seed)
    examples = []
    for i, scene in enumerate(scenes):
        examples.append((i, rng.choice(world.DESCRIBE), scene.caption()))
        examples.extend((i, q, a) for q, a in world.pope_sft_answers(scene, rng))
    return examples


def train_vlm(scenes: list[world.Scene], out_dir: Path, steps: int, seed: int, clip_dir: Path,
              batch: int = 32) -> Path:
    """Supervised fine-tuning on captions and yes/no probes; loss on the answer tokens only.
    The CLIP image tower stays frozen, as in LLaVA-1.5."""
    model, processor = build_vlm(out_dir, scenes, seed, clip_dir)
    model.model.vision_tower.requires_grad_(False)
    tokenizer = processor.tokenizer
    examples = sft_examples(scenes, seed)
    pixels = processor.image_processor([s.draw() for s in scenes], return_tensors="pt")["pixel_values"]
    image_text = {q: processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in {q for _, q, _ in examples}}
    prompt_ids = {q: processor(images=scenes[0].draw(), text=t)["input_ids"][0] for q, t in image_text.items()}
    answer_ids = {a: tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                  for a in {a for _, _, a in examples}}
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    model.train()
    for _ in tqdm(range(steps), desc="toy VLM (SFT)", unit="step", leave=False):
        chosen = [examples[k] for k in rng.sample(range(len(examples)), batch)]
        seqs = [(list(prompt_ids[q]), answer_ids[a]) for _, q, a in chosen]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (p, a) in enumerate(seqs):
            ids[row, :len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[row, :len(p) + len(a)] = 1
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[[i for i, _, _ in chosen]],
                    labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    model.save_pretrained(out_dir)
    to_hub_layout(out_dir)  # the key layout of llava-hf checkpoints, which vLLM loads
    processor.save_pretrained(out_dir)
    return out_dir
