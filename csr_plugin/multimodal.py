"""What the sampler and the trainer share about multimodal inputs."""
from __future__ import annotations

import torch

# LLaVA-1.5's conversation format, used when a processor ships no chat template.
LLAVA_PROMPT = "USER: {image}\n{question} ASSISTANT:"


def concat_image_inputs(items: list[dict]) -> dict:
    """Processor image tensors of several prompts along dim 0 (LLaVA: images; Qwen-VL: patches and grids)."""
    if not items:
        return {}
    keys = set(items[0])
    if any(set(item) != keys for item in items):
        raise ValueError("a batch mixes inputs with and without images; use a batch size of 1 for such data")
    return {key: torch.cat([item[key] for item in items], dim=0) for key in keys}
