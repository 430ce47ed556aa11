"""Multimodal control tokens (image / video placeholders, vision start / end, begin / end of image)
are never sampled, whatever the tokenizer marks as special, and a pair holding one is refused."""
import json
import shutil
import types

import pytest
import torch
from PIL import Image

from conftest import make_engine
from csr_plugin.config import CurationConfig, ModelConfig
from csr_plugin.curation import curate_tree_pairs
from csr_plugin.multimodal import control_token_ids, model_control_token_ids
from csr_plugin.sampling.engine import Expansion
from csr_plugin.sampling.transformers_engine import load_vlm
from csr_plugin.toy.tiny_families import build_tiny_family

QWEN_CONTROL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def unflag_vision_tokens(folder):
    """A community-style Qwen tokenizer: <|vision_start|>, <|vision_end|> and <|video_pad|> are plain
    added tokens, and no video_token is registered (only <|im_end|>, <|endoftext|> and <|image_pad|>
    stay special)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    for token in data["added_tokens"]:
        if token["content"] in ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"):
            token["special"] = False
    path.write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("video_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def unflagged_qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen25_unflagged")
    build_tiny_family("qwen2_5_vl", folder)
    unflag_vision_tokens(folder)
    return folder


def test_the_unflagged_tokenizer_leaves_vision_tokens_out_of_its_special_ids(unflagged_qwen):
    """The premise of the tests below: the tokenizer alone would let them be sampled."""
    model, processor = load_vlm(ModelConfig(path=str(unflagged_qwen), dtype="float32", device="cpu"))
    tokenizer = processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_CONTROL}
    assert not {ids["<|vision_start|>"], ids["<|vision_end|>"], ids["<|video_pad|>"]} & set(tokenizer.all_special_ids)
    assert control_token_ids(model.config, processor) == set(ids.values())
    assert model_control_token_ids(ModelConfig(path=str(unflagged_qwen))) == frozenset(ids.values())


def test_config_names_decide_not_special_flags():
    """Every *_token_id / *_token_index naming images, video or their delimiters; not pad or eos."""
    config = types.SimpleNamespace(to_dict=lambda: {
        "image_token_index": 10, "video_token_id": 11, "vision_start_token_id": 12, "boi_token_index": 13,
        "eoi_token_index": 14, "pad_token_id": 0, "eos_token_id": 1, "vocab_size": 99, "text_config": {"x": 1}})
    assert control_token_ids(config) == {10, 11, 12, 13, 14}


def test_transformers_engine_never_samples_them_even_when_the_model_wants_them(unflagged_qwen):
    """A hook adds +50 to the logits of the four control tokens: unbanned, every sampled token would be
    one of them; banned, none is, and the rest of the distribution is sampled as usual."""
    model, processor = load_vlm(ModelConfig(path=str(unflagged_qwen), dtype="float32", device="cpu"))
    control = sorted(control_token_ids(model.config, processor))
    engine = make_engine((model, processor), max_new_tokens=6)
    assert engine.banned_mask[control].all()
    bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    bias[control] = 50.0
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    try:
        image = Image.new("RGB", (48, 48), (200, 30, 30))
        request = Expansion(engine.encode_prompt("Describe the image.", image), [], 4, seed=3)
        continuations = engine.expand([request])[0]
        sampled = [t for c in continuations for t in c.token_ids]
        assert sampled and not set(sampled) & set(control)
        # the same bias without the ban: the control tokens take over (what the ban prevents)
        engine.banned_mask[control] = False
        unbanned = [t for c in engine.expand([request])[0] for t in c.token_ids]
        assert set(unbanned) <= set(control) | engine.eos_ids
    finally:
        hook.remove()


def test_pargs_and_vllm_engines_ban_them_too(unflagged_qwen):
    from csr_plugin.config import SearchConfig
    from csr_plugin.sampling.pargs_decoding import setup_for
    from csr_plugin.sampling.vllm_engine import VllmEngine

    model, processor = load_vlm(ModelConfig(path=str(unflagged_qwen), dtype="float32", device="cpu"))
    control = control_token_ids(model.config, processor)
    assert control <= setup_for(processor, model).banned_ids
    # VllmEngine reads the model config from the engine it is given (a real one in test_vllm_engine.py)
    model_config = types.SimpleNamespace(max_model_len=512, hf_config=model.config)
    llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(model_config=model_config),
                                get_tokenizer=lambda: processor.tokenizer)
    engine = VllmEngine(llm, processor, SearchConfig())
    assert control <= engine.rules.banned_ids


def _tree(chosen_ids, rejected_ids):
    """A root and two final sentences; the first scores 1.0, the second 0.0."""
    def node(i, ids, reward):
        return {"id": i, "parent": 0, "text": f" text {i}.", "token_ids": ids, "r_i": reward, "r_t": 0.0,
                "reward": reward, "final": True, "finish": "eos", "depth": 1}
    root = {"id": 0, "parent": None, "text": "", "token_ids": [], "r_i": 0.0, "r_t": 0.0, "reward": 0.0,
            "final": False, "depth": 0}
    return {"id": "t", "image": "x.png", "prompt": "Describe.", "nodes": [root, node(1, chosen_ids, 1.0),
                                                                           node(2, rejected_ids, 0.0)]}


def test_curation_refuses_a_pair_that_holds_one():
    cfg = CurationConfig()
    pairs, reason = curate_tree_pairs(_tree([7, 8, 2], [9, 4, 2]), cfg, frozenset({3, 4, 5, 6}))
    assert pairs == [] and reason == "a response holds a multimodal control token (id 4), which training cannot take"
    pairs, reason = curate_tree_pairs(_tree([7, 8, 2], [9, 10, 2]), cfg, frozenset({3, 4, 5, 6}))
    assert len(pairs) == 1 and reason == ""
