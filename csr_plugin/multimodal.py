"""What the sampler and the trainer share about multimodal inputs."""
from __future__ import annotations

import torch

# LLaVA-1.5's conversation format, used when a processor ships no chat template.
LLAVA_PROMPT = "USER: {image}\n{question} ASSISTANT:"


def chat_prompt(processor, question: str) -> str:
    """The generation prompt for one image and ``question``: the processor's chat template, else LLaVA-1.5's."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return LLAVA_PROMPT.format(image=getattr(processor, "image_token", "<image>"), question=question)


def concat_image_inputs(items: list[dict]) -> dict:
    """Processor image tensors of several prompts along dim 0 (LLaVA: images; Qwen-VL: patches and grids)."""
    if not items:
        return {}
    keys = set(items[0])
    if any(set(item) != keys for item in items):
        raise ValueError("a batch mixes inputs with and without images; use a batch size of 1 for such data")
    return {key: torch.cat([item[key] for item in items], dim=0) for key in keys}
