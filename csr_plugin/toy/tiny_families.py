"""Tiny random-weight VLMs of every supported family, built offline from the real transformers classes.

    build_tiny_family(family: str, out_dir, seed=0) -> Path
    FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")

Each folder holds the family's real model class (random weights from its config:
hidden 64-128, 1-2 layers, head_dim 32, since vLLM's CPU attention refuses 16),
its real processor and image processor, a tokenizer trained here on a small
corpus, a chat template and eos/pad ids, written with ``save_pretrained`` so that
``AutoProcessor.from_pretrained`` and ``AutoModelForImageTextToText.from_pretrained``
load it offline. ``llava`` has a SentencePiece-style (LLaMA, "▁" pieces) tokenizer
like llava-hf/llava-1.5-7b-hf; the others use byte-level BPE. ``llava_next``,
``idefics3`` and ``smolvlm`` cut images into tiles, and their tile counts differ
with the image's size and aspect ratio (48x48 vs 96x48 give different counts), so a
batch of prompts with unequal tiles is exercised. Each builds in about a second.

    build_tiny_llava_geometry(out_dir, image_size=336, patch_size=14, hidden=128, seed=0) -> Path
LLaVA-1.5's real image geometry (576 image tokens) on a tiny LM, for benchmarks.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from csr_plugin.checkpoint_layout import to_hub_layout
from csr_plugin.toy.tiny_models import DEFAULT_CORPUS

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")

_VOCAB = 512


def _template(user_start: str, image: str, user_end: str, assistant_start: str, assistant_end: str) -> str:
    """A chat template for one user turn with image/text parts, then the assistant turn."""
    return ("{% for message in messages %}{% if message['role'] == 'user' %}" + user_start
            + "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image
            + "{% else %}{{ part['text'] }}{% endif %}{% endfor %}" + user_end
            + "{% else %}" + assistant_start + "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
            + assistant_end + "{% endif %}{% endfor %}{% if add_generation_prompt %}" + assistant_start
            + "{% endif %}")


def _byte_bpe(special: list[str], **named):
    """Byte-level BPE trained on the toy corpus; ``special`` become added special tokens (ids 0..)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB + len(special), special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(DEFAULT_CORPUS), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **named)


def _llama_sentencepiece():
    """A LLaMA-style tokenizer: Metaspace "▁" pieces, byte fallback, <s> prepended, as LLaVA-1.5's.

    Trained with ``tokenizers`` (BPE over Metaspace words) and handed to ``LlamaTokenizer`` as
    vocab + merges, which is how transformers 5 itself rebuilds a SentencePiece BPE model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # split=True while training: SentencePiece never merges across a word boundary.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(list(DEFAULT_CORPUS) + ["USER: ASSISTANT:"] * 4, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = dict(state["vocab"])
    for b in range(256):  # byte-fallback pieces, as in a real SentencePiece vocab
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    # llava-hf appends <image> (32000) and <pad> (32001) after the SentencePiece vocab.
    return LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=2048, add_bos_token=True, pad_token="<pad>",
                          extra_special_tokens={"image_token": "<image>"})


def _llama_text(tokenizer, hidden=64, layers=2, heads=2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=hidden // heads, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _clip_vision(image_size=32, patch_size=8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=64)


def _llava(out: Path, image_size: int = 32, patch_size: int = 8, hidden: int = 64):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _llama_sentencepiece()
    config = LlavaConfig(vision_config=_clip_vision(image_size, patch_size),
                         text_config=_llama_text(tokenizer, hidden=hidden),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch_size) ** 2,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=_template("USER: ", "<image>\n", "", " ASSISTANT:", "</s>"))
    return LlavaForConditionalGeneration(config), processor, tokenizer


def _llava_next(out: Path):
    # Surprise: the processor pads pixel_values to the most tiles *in its call*; one prompt at a
    # time gives [1, tiles, 3, 32, 32] with its own count (48x48 -> 5, 96x48 -> 3), so batches pad tiles.
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tokenizer = _byte_bpe(["<pad>", "<s>", "</s>", "<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                          extra_special_tokens={"image_token": "<image>"})
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=_clip_vision(), text_config=_llama_text(tokenizer),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_seq_length=16)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=_template("[INST] ", "<image>\n", " [/INST]", "", "</s>"))
    return LlavaNextForConditionalGeneration(config), processor, tokenizer


_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
_QWEN_TEMPLATE = _template("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                           "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n",
                           "<|im_start|>assistant\n", "<|im_end|>\n")


def _qwen(version: str):
    import transformers as tf

    tokenizer = _byte_bpe(_QWEN_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL}
    # M-RoPE: the rotary half-dim (head_dim 32 -> 16) split over (time, height, width).
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        vision = dict(depth=1, embed_dim=64, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        model = tf.Qwen2VLForConditionalGeneration(config)
    else:
        # Qwen2.5-VL's windowed vision attention: window 32 px = 2x2 merged units per window.
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=32,
                      fullatt_block_indexes=[1])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
    # Images are resized to multiples of patch*merge = 16 px, so 48x48 -> 9 image tokens, 96x48 -> 18.
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=128 * 128)
    image_processor = tf.Qwen2VLImageProcessor(**sizes)
    video_processor = tf.Qwen2VLVideoProcessor(**sizes)
    cls = tf.Qwen2VLProcessor if version == "2" else tf.Qwen2_5_VLProcessor
    processor = cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                    chat_template=_QWEN_TEMPLATE)
    return model, processor, tokenizer


def _gemma3(out: Path):
    # Surprises: the processor's own image token is <start_of_image> (it expands it to
    # "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n"), and it returns `token_type_ids`
    # (1 on soft image tokens) that the model needs for bidirectional attention inside the image.
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              SiglipVisionConfig)

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               "<end_of_image>", "<image_soft_token>"]
    tokenizer = _byte_bpe(special, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                          extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                                "eoi_token": "<end_of_image>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    # Sliding window 512 (> any test sequence) on layer 0, full attention on layer 1: both layer
    # kinds and their cache layers run, and the reference forward stays exact.
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                max_position_embeddings=2048, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
                bos_token_id=ids["<bos>"])
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"], pad_token_id=ids["<pad>"],
                          eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False),
        tokenizer=tokenizer, image_seq_length=4,
        chat_template="{{ bos_token }}" + _template("<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n",
                                                     "<start_of_turn>model\n", "<end_of_turn>\n"))
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    return model, processor, tokenizer


def _idefics_tokenizer():
    tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    special = ["<|end_of_text|>", "<|begin_of_text|>", "<pad>", "<fake_token_around_image>", "<image>",
               "<global-img>", "<end_of_utterance>", "<video>"] + tiles
    return _byte_bpe(special, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<pad>",
                     extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                           "global_image_token": "<global-img>",
                                           "end_of_utterance_token": "<end_of_utterance>"})


_IDEFICS_TEMPLATE = "{{ bos_token }}" + _template("User:", "<image>", "<end_of_utterance>\n", "Assistant:",
                                                  "<end_of_utterance>\n")


def _idefics3(out: Path, smol: bool):
    # Surprises: an image becomes rows x cols tiles of 32 px plus a global view, each image_seq_len=4
    # tokens behind a <row_r_col_c> tag (48x48 -> 2x2+1 tiles, 96x48 -> 1x2+1); pixel_values is
    # [images, tiles, 3, 32, 32] and a batch pads it with all-zero tiles, which the model skips.
    # SmolVLM's processor also wants a video processor and the `num2words` package.
    import transformers as tf

    tokenizer = _idefics_tokenizer()
    text = _llama_text(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    if smol:
        config = tf.SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2,
                                  pad_token_id=tokenizer.pad_token_id)
        model = tf.SmolVLMForConditionalGeneration(config)
        processor = tf.SmolVLMProcessor(image_processor=tf.SmolVLMImageProcessor(**sizes), tokenizer=tokenizer,
                                        video_processor=tf.SmolVLMVideoProcessor(), image_seq_len=4,
                                        chat_template=_IDEFICS_TEMPLATE)
    else:
        config = tf.Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2,
                                   pad_token_id=tokenizer.pad_token_id)
        model = tf.Idefics3ForConditionalGeneration(config)
        processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(**sizes), tokenizer=tokenizer,
                                         image_seq_len=4, chat_template=_IDEFICS_TEMPLATE)
    return model, processor, tokenizer


_BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": lambda out: _qwen("2"),
    "qwen2_5_vl": lambda out: _qwen("2.5"),
    "gemma3": _gemma3,
    "idefics3": lambda out: _idefics3(out, smol=False),
    "smolvlm": lambda out: _idefics3(out, smol=True),
}


def build_tiny_family(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` VLM (model + processor) to ``out_dir``; returns ``out_dir``."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}.")
    return _save(out_dir, seed, _BUILDERS[family])


def build_tiny_llava_geometry(out_dir: str | Path, image_size: int = 336, patch_size: int = 14, hidden: int = 128,
                              seed: int = 0) -> Path:
    """LLaVA-1.5's real image geometry (336 px, patch 14: 576 image tokens) on a tiny random model."""
    return _save(out_dir, seed, lambda out: _llava(out, image_size, patch_size, hidden))


def _save(out_dir, seed: int, builder) -> Path:
    out = Path(out_dir)
    torch.manual_seed(seed)
    model, processor, tokenizer = builder(out)
    eos = model.config.get_text_config().eos_token_id
    model.generation_config.eos_token_id = model.generation_config.eos_token_id or eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    to_hub_layout(out)  # LLaVA / LLaVA-NeXT keys as on the hub, which vLLM loads (a no-op for the rest)
    return out
