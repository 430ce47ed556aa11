"""Tiny models built offline from the real builders, saved in the standard formats.

``build_tiny_vlm`` writes a LLaVA-architecture checkpoint (CLIP vision tower,
projector, LLaMA decoder with head_dim 32, the smallest vLLM's CPU attention
takes) in the hub's key layout, with a byte-level BPE tokenizer trained here, and a
processor with a chat template: AutoModelForImageTextToText and AutoProcessor
load it exactly as they load llava-hf/llava-1.5-7b-hf. ``build_tiny_clip``
writes an open_clip model-config JSON and a weights file, loaded as
``clip: {model: <name>, config: <json>, pretrained: <weights>}``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from csr_plugin.checkpoint_layout import to_hub_layout

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

DEFAULT_CORPUS = [
    "There is a red circle in the image.", "A blue square sits on the left.", "The green triangle is small.",
    "A yellow star is next to the circle.", "Describe the image in detail.", "What objects are in the picture?",
    "The picture shows two shapes!", "Is there a cat? No, there is a dog.", "The sky is blue, and the grass is green.",
    "It is big.\nIt is round.", "\"Hello.\" she said.", "Shapes: circle, square, triangle, star, heart.",
]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``corpus``: '.' merges into other tokens, as in real BPEs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=2048)


def build_tiny_vlm(out_dir: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS, seed: int = 0,
                   hidden: int = 64, layers: int = 2, image_size: int = 32, patch_size: int = 8,
                   vocab_size: int = 512) -> Path:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus, vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       # head_dim 32: vLLM's CPU attention refuses 16
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    n_patches = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=n_patches, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    model.save_pretrained(out_dir)
    to_hub_layout(out_dir)  # the key layout of llava-hf checkpoints, which vLLM loads
    processor.save_pretrained(out_dir)
    return out_dir


def tiny_clip_config(image_size: int = 32, embed_dim: int = 32) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def build_tiny_clip(out_dir: str | Path, name: str = "tiny-clip", seed: int = 0) -> tuple[Path, Path]:
    """(config JSON, weights file) of a random tiny open_clip model, loadable offline."""
    import open_clip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / f"{name}.json"
    config_path.write_text(json.dumps(tiny_clip_config(), indent=2))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights_path = out_dir / f"{name}.pt"
    torch.save(model.state_dict(), weights_path)
    return config_path, weights_path
