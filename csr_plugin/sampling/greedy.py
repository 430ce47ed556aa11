"""Greedy decoding of whole answers with ``model.generate``: `csr eval`'s default decoding.

The sentence engines (transformers, vLLM, PARGS) continue prefixes sentence by sentence for the
search; evaluation wants plain greedy answers, batched, for any family the engines take.
"""
from __future__ import annotations

import torch
from tqdm import tqdm


@torch.inference_mode()
def generate(model, processor, items: list[tuple], max_new_tokens: int, batch: int, desc: str) -> list[str]:
    """Greedy answers for (PIL image, question) items, batched with left padding.

    Images go to the processor as one list per text: Gemma3 and Idefics3/SmolVLM read a
    flat list as all images of the first text, and every family accepts the nested form.
    """
    from csr_plugin.multimodal import chat_prompt

    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    answers = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(items), batch), desc=desc, unit="batch", leave=False):
        chunk = items[start:start + batch]
        inputs = processor(images=[[image] for image, _ in chunk], text=[chat_prompt(processor, q) for _, q in chunk],
                           padding=True, return_tensors="pt").to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]
