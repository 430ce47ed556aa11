"""What the sampler, the trainer, the reward scorer and evaluation share about multimodal inputs.

A processor returns two kinds of tensors. *Per-image* ones (pixel_values,
image_grid_thw, image_sizes, pixel_attention_mask) describe the image and do
not change when the text around it is padded, extended with a response,
replicated or compacted. *Per-token* ones (Qwen-VL's ``mm_token_type_ids`` and
M-RoPE positions, Gemma3's ``token_type_ids``) follow the text, and the
processor's copies cover the prompt only. So we keep the per-image tensors of
each prompt and rebuild every per-token tensor from the token ids themselves,
for whatever batch is run.

API:
    family_of(config) -> FamilySpec            # raises UnsupportedModelError at load
    encode_prompt(processor, prompt_text, image) -> (token_ids, image_inputs)
    batch_inputs(config, rows, image_inputs, pad_id, padding_side="left") -> model kwargs
        config: the model's config (model.config); rows: full token id lists (prompt +
        response), one per batch row; image_inputs: one encode_prompt dict per row (the
        same dict may repeat for replicated rows). Returns input_ids, attention_mask, the
        per-image tensors concatenated (tiles padded where a family tiles), the family's
        per-token tensors and, for M-RoPE families, explicit ``position_ids`` [3, rows,
        width]. Other families need none: with right padding positions are the default,
        and left padding shifts a row's rotary positions uniformly, which attention ignores.
    mrope_positions(config, token_ids, image_grid_thw) -> [3, len] LongTensor (one unpadded row)
    chat_prompt(processor, question), LLAVA_PROMPT, concat_image_inputs(items)
"""
from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Optional

import torch

# LLaVA-1.5's conversation format, used when a processor ships no chat template.
LLAVA_PROMPT = "USER: {image}\n{question} ASSISTANT:"


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    image_keys: tuple[str, ...]        # per-image processor tensors, kept and concatenated over rows
    token_type_key: Optional[str] = None  # per-token image mask the model reads (1 on image tokens)
    mrope: bool = False                # Qwen-VL 3D rotary positions: pass explicit position_ids


_FAMILIES = {spec.model_type: spec for spec in (
    FamilySpec("llava", ("pixel_values",)),
    # pixel_values [images, tiles, ...]: padding tiles are dropped by the model, which recomputes
    # each image's tile count from image_sizes (LLaVA-NeXT) or skips all-zero tiles (Idefics3).
    FamilySpec("llava_next", ("pixel_values", "image_sizes")),
    FamilySpec("qwen2_vl", ("pixel_values", "image_grid_thw"), token_type_key="mm_token_type_ids", mrope=True),
    FamilySpec("qwen2_5_vl", ("pixel_values", "image_grid_thw"), token_type_key="mm_token_type_ids", mrope=True),
    # token_type_ids marks the image block, which attends to itself bidirectionally.
    FamilySpec("gemma3", ("pixel_values",), token_type_key="token_type_ids"),
    FamilySpec("idefics3", ("pixel_values", "pixel_attention_mask")),
    FamilySpec("smolvlm", ("pixel_values", "pixel_attention_mask")),
)}
SUPPORTED_FAMILIES = tuple(_FAMILIES)
# A processor does not name its model family, so a prompt keeps every per-image key any family uses.
_IMAGE_KEYS = {k for spec in _FAMILIES.values() for k in spec.image_keys}


def family_of(config) -> FamilySpec:
    """The input layout of a model from its config; unknown families fail here, at load."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported VLM family; supported: {', '.join(SUPPORTED_FAMILIES)}. "
            "Use a checkpoint of one of these families, or add its FamilySpec in csr_plugin/multimodal.py.")
    return _FAMILIES[model_type]


def image_token_id(config) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise UnsupportedModelError(f"{config.model_type} config names no image token id (image_token_id).")


# Names of config / processor fields that hold a multimodal control token: image and video placeholders
# and their delimiters (Qwen's vision start/end, Gemma3's begin/end of image, Idefics3's fake token).
_CONTROL_NAME = re.compile(r"image|video|vision|boi|eoi|audio")


def control_token_ids(config=None, processor=None) -> set[int]:
    """Every token id the model's config or processor names for images, video and their delimiters.

    None of them may be sampled, whatever the tokenizer marks as special: community tokenizers often
    leave Qwen's <|video_pad|> and <|vision_end|> unflagged, and a sampled video token later fails
    training inside Qwen's position ids (a video token with no video grid).
    """
    ids: set[int] = set()
    if config is not None:
        for name, value in config.to_dict().items():
            if (name.endswith(("_token_id", "_token_index")) and _CONTROL_NAME.search(name)
                    and isinstance(value, int) and not isinstance(value, bool)):
                ids.add(value)
    if processor is not None:
        tokenizer = getattr(processor, "tokenizer", processor)
        for owner in dict.fromkeys([processor, tokenizer]):
            for name in dir(owner):
                if name.startswith("_") or not _CONTROL_NAME.search(name):
                    continue
                if name.endswith("_token_id"):
                    value = getattr(owner, name, None)
                    ids.update([value] if isinstance(value, int) and not isinstance(value, bool) else [])
                elif name.endswith("_token"):
                    token = getattr(owner, name, None)
                    token_id = tokenizer.convert_tokens_to_ids(str(token)) if isinstance(token, str) and token else None
                    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                        ids.add(token_id)
    return ids


def model_control_token_ids(model_cfg) -> frozenset[int]:
    """:func:`control_token_ids` of the checkpoint a recipe's `model:` section names (config and processor
    only: no weights are loaded)."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    processor = AutoProcessor.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    return frozenset(control_token_ids(config, processor))


def processor_image_token_id(processor) -> Optional[int]:
    """The image placeholder's token id as the processor (or its tokenizer) states it; None if neither does."""
    tokenizer = getattr(processor, "tokenizer", processor)
    for owner in (processor, tokenizer):
        token_id = getattr(owner, "image_token_id", None)
        if token_id is not None:
            return token_id
    token = getattr(processor, "image_token", None)
    return tokenizer.convert_tokens_to_ids(token) if token else None


def chat_prompt(processor, question: str) -> str:
    """The generation prompt for one image and ``question``: the processor's chat template, else LLaVA-1.5's."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return LLAVA_PROMPT.format(image=getattr(processor, "image_token", "<image>"), question=question)


def encode_prompt(processor, prompt_text: str, image) -> tuple[list[int], dict]:
    """(token ids, per-image tensors) of one prompt; per-token tensors are dropped (rebuilt per batch)."""
    inputs = processor(images=image, text=prompt_text, return_tensors="pt")
    token_ids = inputs["input_ids"][0].tolist()
    return token_ids, {k: v for k, v in inputs.items() if k in _IMAGE_KEYS}


def _pad_tiles(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [images, tiles, ...] tensors whose tile counts differ, padding with zero tiles."""
    most = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[1] < most:
            t = torch.cat([t, t.new_zeros((t.shape[0], most - t.shape[1], *t.shape[2:]))], dim=1)
        padded.append(t)
    return torch.cat(padded, dim=0)


def concat_image_inputs(items: list[dict]) -> dict:
    """Per-image tensors of several rows along dim 0. Tiled tensors ([images, tiles, ...], LLaVA-NeXT,
    Idefics3) whose tile counts differ are padded with zero tiles, which those models drop."""
    if not items:
        return {}
    keys = set(items[0])
    if any(set(item) != keys for item in items):
        raise ValueError("a batch mixes inputs with and without images; use a batch size of 1 for such data")
    out = {}
    for key in keys:
        tensors = [item[key] for item in items]
        if len({t.shape[1:] for t in tensors}) > 1 and len({t.shape[2:] for t in tensors}) == 1:
            out[key] = _pad_tiles(tensors)
        else:
            out[key] = torch.cat(tensors, dim=0)
    return out


def mrope_positions(config, token_ids: list[int], image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
    """Qwen-VL M-RoPE positions [3, len] of one unpadded row, images only (as get_rope_index).

    Text tokens count up on all three axes; an image block of (t, h, w) patches, merged
    ``m`` x ``m``, takes (start, start + row, start + col) and moves the text on by max(h, w) / m.
    Tokens after the prompt (a response) are plain text, so any prefix extends it correctly.
    """
    image_id = image_token_id(config)
    merge = config.vision_config.spatial_merge_size
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    ids = torch.tensor(token_ids)
    out = torch.empty(3, len(token_ids), dtype=torch.long)
    pos, i, n = 0, 0, len(token_ids)
    is_image = (ids == image_id).tolist()
    while i < n:
        j = i
        while j < n and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            out[:, i:j] = torch.arange(pos, pos + j - i)
            pos += j - i
        else:
            t, h, w = next(grids)
            h, w = h // merge, w // merge
            if t * h * w != j - i:
                raise ValueError(f"an image block of {j - i} tokens does not match its grid {(t, h, w)}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            out[:, i:j] = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
            pos += max(h, w)
        i = j
    return out


def token_types(config, input_ids: torch.Tensor) -> torch.Tensor:
    """1 on image tokens, 0 elsewhere (padding included), for any batch layout."""
    return (input_ids == image_token_id(config)).long()


def batch_inputs(config, rows: list[list[int]], image_inputs: list[dict], pad_id: int,
                 padding_side: str = "left") -> dict:
    """Model kwargs for one forward over full sequences ``rows`` (see the module docstring)."""
    if len(rows) != len(image_inputs):
        raise ValueError(f"{len(rows)} rows but {len(image_inputs)} image inputs; give one per row.")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    spec = family_of(config)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    spans = []
    for i, row in enumerate(rows):
        start = width - len(row) if padding_side == "left" else 0
        input_ids[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, start:start + len(row)] = 1
        spans.append((start, start + len(row)))
    kwargs = {"input_ids": input_ids, "attention_mask": attention}
    kwargs.update(concat_image_inputs([{k: v for k, v in item.items() if k in spec.image_keys}
                                       for item in image_inputs]))
    if spec.token_type_key:
        kwargs[spec.token_type_key] = token_types(config, input_ids)
    if spec.mrope:
        kwargs["position_ids"] = torch.zeros((3, len(rows), width), dtype=torch.long)
        for i, (row, item, (a, b)) in enumerate(zip(rows, image_inputs, spans)):
            kwargs["position_ids"][:, i, a:b] = mrope_positions(config, row, item.get("image_grid_thw"))
    return kwargs
