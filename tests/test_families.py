"""Every supported VLM family through the multimodal input layer and the transformers engine.

The reference is independent of our input layer: the processor's own tensors for the prompt
(per-token ones extended with 0 over the response, as they are text) and one plain unpadded
forward with no cache, where the model builds its own positions (Qwen: get_rope_index).
Tolerance 1e-4 in fp32: padding, batching, caching and explicit positions change only rounding.
"""
import pytest
import torch
from PIL import Image

from csr_plugin.config import ModelConfig, SearchConfig
from csr_plugin.multimodal import UnsupportedModelError, batch_inputs, family_of
from csr_plugin.sampling.engine import Expansion
from csr_plugin.sampling.transformers_engine import TransformersEngine, load_vlm
from csr_plugin.toy.tiny_families import FAMILIES, build_tiny_family

QUESTIONS = ["Describe the image.", "What shapes and colours do you see in this picture?"]
# Unequal sizes and aspect ratios: different image token / tile counts within one batch.
IMAGES = [((48, 48), (200, 30, 30)), ((96, 48), (0, 0, 255))]


@pytest.fixture(scope="session")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request, family_root):
    path = build_tiny_family(request.param, family_root / request.param)
    model, processor = load_vlm(ModelConfig(path=str(path), dtype="float32", device="cpu"))
    return request.param, model, processor


def _image(i):
    size, colour = IMAGES[i]
    return Image.new("RGB", size, colour)


def reference_logprobs(model, engine, question, image, prefix, new_ids):
    inputs = dict(engine.processor(images=image, text=engine.prompt_text(question), return_tensors="pt"))
    extra = len(prefix) + len(new_ids)
    ids = torch.cat([inputs.pop("input_ids"), torch.tensor([prefix + new_ids], dtype=torch.long)], dim=1)
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in inputs:  # per-token: the response is text (type 0), attended (mask 1)
            fill = 1 if key == "attention_mask" else 0
            inputs[key] = torch.cat([inputs[key], torch.full((1, extra), fill, dtype=inputs[key].dtype)], dim=1)
    inputs.pop("num_crops", None)
    with torch.no_grad():
        logits = model(input_ids=ids, **inputs).logits[0].float()
    start = ids.shape[1] - extra + len(prefix)
    logp = logits[start - 1:start - 1 + len(new_ids)].log_softmax(-1)
    return logp.gather(-1, torch.tensor(new_ids)[:, None]).squeeze(-1).tolist()


@pytest.mark.parametrize("prompt_cache", [True, False])
def test_sampled_logprobs_match_a_plain_forward(family, prompt_cache):
    """Two prompts of different lengths and image geometry, one with a prefix, K = 6 and 5; then a
    second call continues longer prefixes (from the prompt cache when on). Letters as sentence
    delimiters make many tokens end a sentence, so rows finish at different steps and the
    engine drops finished rows mid-decode (checked through its counter)."""
    name, model, processor = family
    search = SearchConfig(beam_width=3, candidates=3, keep_top=1, keep_bottom=2, max_new_tokens=8,
                          delimiters=[".", "e", "a", "s"])
    engine = TransformersEngine(model, processor, search, prompt_cache=prompt_cache)
    tok = processor.tokenizer
    prompts = [engine.encode_prompt(q, _image(i)) for i, q in enumerate(QUESTIONS)]
    assert len(prompts[0].token_ids) != len(prompts[1].token_ids)
    prefix = tok.encode(" There is a red circle.", add_special_tokens=False)
    first = [Expansion(prompts[0], [], 6, seed=1), Expansion(prompts[1], prefix, 5, seed=2)]
    results = engine.expand(first)
    second = [Expansion(prompts[0], results[0][0].token_ids, 3, seed=3),
              Expansion(prompts[1], prefix + results[1][1].token_ids, 2, seed=4),
              Expansion(prompts[1], [], 2, seed=5)]
    checked = 0
    for requests in (first, second):
        for request, conts in zip(requests, results if requests is first else engine.expand(requests)):
            assert len(conts) == request.n
            i = prompts.index(request.prompt)
            for cont in conts:
                expected = reference_logprobs(model, engine, QUESTIONS[i], _image(i), request.prefix_ids,
                                              cont.token_ids)
                assert cont.logprobs == pytest.approx(expected, abs=1e-4), name
                checked += 1
    assert checked == 6 + 5 + 3 + 2 + 2
    assert engine.stats["rows_dropped"] > 0, "no row finished early: row dropping went untested"
    # each image encoded once across both calls with the cache; never without it
    assert engine.stats["prompt_prefills"] == (2 if prompt_cache else 0)


def test_prompt_cache_prefills_each_prompt_once_and_is_bounded(family):
    name, model, processor = family
    engine = TransformersEngine(model, processor, SearchConfig(beam_width=3, candidates=3, keep_top=1, keep_bottom=2,
                                                               max_new_tokens=4))
    a, b = (engine.encode_prompt(q, _image(i)) for i, q in enumerate(QUESTIONS))
    if name == "gemma3":  # sliding-window layers: a sequence that could reach the window takes the full path
        assert engine.sliding_window == 512
        engine.sliding_window = len(a.token_ids) + 4
        engine.expand([Expansion(a, [], 2)])
        assert engine.stats["prompt_prefills"] == 0 and engine.stats["prefill_tokens"] == len(a.token_ids)
        engine = TransformersEngine(model, processor, engine.search)
    engine.expand([Expansion(a, [], 2)])
    assert engine.stats == {"prefill_tokens": len(a.token_ids) - 1 + 1, "prompt_prefills": 1,
                            "rows_dropped": engine.stats["rows_dropped"], "batches": 1, "oom_halvings": 0,
                            "kept_prefixes": 0}
    words = processor.tokenizer.encode(" A red circle is big", add_special_tokens=False)
    engine.expand([Expansion(a, words[:3], 2), Expansion(a, words[:1], 1)])
    assert engine.stats["prompt_prefills"] == 1
    assert engine.stats["prefill_tokens"] == len(a.token_ids) + (1 + 3) + (1 + 1)
    engine.expand([Expansion(b, [], 1)])          # a is no longer requested: its KV is dropped
    assert [c.prompt for c in engine._cached.values()] == [b]
    engine.expand([Expansion(a, words[:1], 1)])   # and is prefilled again when it comes back
    assert engine.stats["prompt_prefills"] == 3


def test_batch_inputs_builds_per_token_tensors_from_ids(family):
    """Left padding and replication: Qwen's M-RoPE positions equal the model's own get_rope_index,
    Gemma3's token types mark exactly the image tokens, tiles pad to the largest count."""
    name, model, processor = family
    engine = TransformersEngine(model, processor, SearchConfig(beam_width=3, candidates=3, keep_top=1, keep_bottom=2))
    prompts = [engine.encode_prompt(q, _image(i)) for i, q in enumerate(QUESTIONS)]
    response = processor.tokenizer.encode(" A red circle.", add_special_tokens=False)
    rows = [prompts[0].token_ids + response, prompts[1].token_ids, prompts[1].token_ids]
    kwargs = batch_inputs(model.config, rows, [prompts[0].image_inputs] + [prompts[1].image_inputs] * 2,
                          engine.pad_id, "left")
    width = max(map(len, rows))
    assert kwargs["input_ids"].shape == (3, width)
    assert kwargs["attention_mask"].sum(1).tolist() == [len(r) for r in rows]
    spec = family_of(model.config)
    image_id = model.config.image_token_id
    if spec.token_type_key:
        assert torch.equal(kwargs[spec.token_type_key].bool(), kwargs["input_ids"] == image_id)
    if spec.mrope:
        expected, _ = model.model.get_rope_index(kwargs["input_ids"], kwargs["mm_token_type_ids"],
                                                 image_grid_thw=kwargs["image_grid_thw"],
                                                 attention_mask=kwargs["attention_mask"])
        mask = kwargs["attention_mask"].bool()
        assert torch.equal(kwargs["position_ids"][:, mask], expected[:, mask])
    if name in ("llava_next", "idefics3", "smolvlm"):
        tiles = [p.image_inputs["pixel_values"].shape[1] for p in prompts]
        assert tiles[0] != tiles[1]
        assert kwargs["pixel_values"].shape[:2] == (3, max(tiles))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_padded_batch_forward_equals_each_row_alone(family, padding_side):
    """What the DPO collate and the reward scorer run: response log-probs of a padded batch (rows
    of different lengths, images and tile counts) equal each row's plain forward within 1e-4."""
    name, model, processor = family
    engine = TransformersEngine(model, processor, SearchConfig(beam_width=3, candidates=3, keep_top=1, keep_bottom=2))
    response = processor.tokenizer.encode(" A red circle. It is big.", add_special_tokens=False)
    prompts = [engine.encode_prompt(q, _image(i)) for i, q in enumerate(QUESTIONS)]
    rows = [prompts[0].token_ids + response, prompts[1].token_ids + response[:3]]
    kwargs = batch_inputs(model.config, rows, [p.image_inputs for p in prompts], engine.pad_id, padding_side)
    with torch.no_grad():
        logits = model(**kwargs).logits.float()
    for i, (row, n) in enumerate(zip(rows, (len(response), 3))):
        start = logits.shape[1] - len(row) if padding_side == "left" else 0
        logp = logits[i, start + len(row) - n - 1:start + len(row) - 1].log_softmax(-1)
        got = logp.gather(-1, torch.tensor(row[-n:])[:, None]).squeeze(-1).tolist()
        expected = reference_logprobs(model, engine, QUESTIONS[i], _image(i), [], row[-n:])
        assert got == pytest.approx(expected, abs=1e-4), name


def test_unsupported_family_fails_at_load(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32,
                vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"model_type 'llama' is not a supported VLM family.*qwen2_5_vl"):
        load_vlm(ModelConfig(path=str(tmp_path), dtype="float32", device="cpu"))
