"""Shared tiny models, built offline once per test session through the real builders."""
from __future__ import annotations

import os

import pytest

from csr_plugin.accelerator import enable_flash_attn_import

# flash-attn's pure-Python install (no CUDA kernels) imports only with its Triton backend; where the
# kernels are installed the variable would switch them off, so it is set only where they are absent.
enable_flash_attn_import()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    from csr_plugin.toy.quickstart import prepare_tiny_assets

    return prepare_tiny_assets(tmp_path_factory.mktemp("tiny"), n_prompts=6)


@pytest.fixture(scope="session")
def tiny_recipe_dict(tiny_root):
    """A recipe for the tiny models; tests copy it and change what they test."""
    return {
        "model": {"path": str(tiny_root / "vlm"), "dtype": "float32", "device": "cpu"},
        "clip": {"model": "tiny-clip", "config": str(tiny_root / "clip" / "tiny-clip.json"),
                 "pretrained": str(tiny_root / "clip" / "tiny-clip.pt"), "device": "cpu"},
        "data": {"prompts": str(tiny_root / "prompts" / "prompts.jsonl")},
        "output_dir": "unused",
        "search": {"beam_width": 3, "candidates": 3, "keep_top": 1, "keep_bottom": 2, "max_sentences": 3,
                   "max_new_tokens": 12, "batch_prompts": 4},
    }


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_recipe_dict):
    from csr_plugin.config import recipe_from_dict
    from csr_plugin.sampling.transformers_engine import load_vlm

    return load_vlm(recipe_from_dict(tiny_recipe_dict).model)


@pytest.fixture(scope="session")
def tiny_clip(tiny_recipe_dict):
    from csr_plugin.config import recipe_from_dict
    from csr_plugin.reward.clip_relevance import ClipRelevance

    return ClipRelevance(recipe_from_dict(tiny_recipe_dict).clip)


def make_engine(model_and_processor, **search_overrides):
    from csr_plugin.config import SearchConfig
    from csr_plugin.sampling.transformers_engine import TransformersEngine

    defaults = {"beam_width": 3, "candidates": 3, "keep_top": 1, "keep_bottom": 2, "max_new_tokens": 12}
    defaults.update(search_overrides)
    model, processor = model_and_processor
    return TransformersEngine(model, processor, SearchConfig(**defaults))


def reference_logprobs(model, hf_engine, question, image, prefix, new_ids):
    """Log-probs of ``new_ids`` after prompt + prefix from one unpadded forward, no cache: the
    independent value every engine's reported log-probs are checked against."""
    import torch

    prompt = hf_engine.encode_prompt(question, image)
    ids = torch.tensor([prompt.token_ids + prefix + new_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, **prompt.image_inputs).logits[0].float()
    start = len(prompt.token_ids) + len(prefix)
    logp = logits[start - 1:start - 1 + len(new_ids)].log_softmax(-1)
    return logp.gather(-1, torch.tensor(new_ids)[:, None]).squeeze(-1).tolist()
