"""The transformers engine holds each prompt's KV once for all its rows, splits a step larger than
search.max_batch_tokens into batches, and halves that budget on an out-of-memory error: the
continuations (and so the trees) are the same whichever way a step runs."""
import logging

import pytest
import torch
from PIL import Image

from csr_plugin.config import ModelConfig, SearchConfig
from csr_plugin.sampling.engine import Expansion
from csr_plugin.sampling.transformers_engine import TransformersEngine, load_vlm
from csr_plugin.toy.tiny_families import FAMILIES, build_tiny_family

SEARCH = dict(beam_width=3, candidates=3, keep_top=1, keep_bottom=2, max_new_tokens=6)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = build_tiny_family(request.param, tmp_path_factory.mktemp(request.param))
    return load_vlm(ModelConfig(path=str(path), dtype="float32", device="cpu"))


def _requests(engine):
    """Two prompts on images of different shapes, three beams each with prefixes of different lengths,
    so rows of one prompt differ in their own length and prompts differ in theirs."""
    words = engine.tokenizer.encode(" A red circle is on the left of a blue square", add_special_tokens=False)
    prompts = [engine.encode_prompt("Describe the image.", Image.new("RGB", (48, 48), (200, 30, 30))),
               engine.encode_prompt("What shapes do you see in this picture?", Image.new("RGB", (96, 48), (0, 0, 255)))]
    return [Expansion(prompts[i % 2], words[:length], 3, seed=10 * i + length)
            for i, length in enumerate([0, 2, 5, 1, 4, 3])]


def _run(model_and_processor, share=True, prompt_cache=True, **search):
    model, processor = model_and_processor
    engine = TransformersEngine(model, processor, SearchConfig(**{**SEARCH, **search}), prompt_cache=prompt_cache)
    engine.share_prompt = share
    return engine, engine.expand(_requests(engine))


def _same(a, b):
    assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
    assert [[c.finish for c in cs] for cs in a] == [[c.finish for c in cs] for cs in b]
    for cs_a, cs_b in zip(a, b):
        for ca, cb in zip(cs_a, cs_b):
            assert ca.logprobs == pytest.approx(cb.logprobs, abs=1e-4)


def test_sharing_the_prompt_kv_gives_the_same_continuations(family):
    """Shared (new), copied per row (the engine before) and no prompt cache at all: same tokens,
    log-probs within 1e-4 (fp32 rounding of another summation order)."""
    _, shared = _run(family, share=True)
    _, copied = _run(family, share=False)
    _, uncached = _run(family, prompt_cache=False)
    _same(shared, copied)
    _same(shared, uncached)


def test_rows_hold_only_their_own_tokens(family):
    """After the shared prefill the rows' cache is [requests, kv heads, own length, d]: the last prompt
    token and the longest prefix (5 words), no prompt; copied, every request also holds its prompt."""
    model, processor = family
    for share in (True, False):
        engine = TransformersEngine(model, processor, SearchConfig(**SEARCH))
        engine.share_prompt = share
        requests = _requests(engine)
        longest_prompt = max(len(r.prompt.token_ids) for r in requests)
        with torch.inference_mode():
            cache, *_ = engine._prefill_from_prompt_cache(requests)
        keys = cache.layers[0].keys
        assert keys.shape[0] == len(requests)
        assert keys.shape[2] == (1 + 5 if share else longest_prompt - 1 + 1 + 5)


def test_a_kv_budget_splits_the_step_into_batches_with_the_same_continuations(family):
    engine, whole = _run(family)
    assert engine.stats["batches"] == 1
    requests = _requests(engine)
    one = engine.kv_tokens(requests[:1])
    small, split = _run(family, max_batch_tokens=one + 1)   # room for about one request at a time
    assert small.stats["batches"] >= 4
    _same(whole, split)


def test_an_out_of_memory_error_halves_the_budget_and_the_step_completes(family, monkeypatch, caplog):
    model, processor = family
    engine = TransformersEngine(model, processor, SearchConfig(**SEARCH))
    requests = _requests(engine)
    expected = engine.expand(requests)
    real = TransformersEngine._expand
    calls = []

    def tight_memory(self, batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(TransformersEngine, "_expand", tight_memory)
    engine = TransformersEngine(model, processor, SearchConfig(**SEARCH))
    with caplog.at_level(logging.DEBUG, logger="csr_plugin.sampling.transformers_engine"):
        got = engine.expand(requests)
        again = engine.expand(requests)   # the halved budget stays: no new error, no new warning
    _same(expected, got)
    _same(expected, again)
    assert engine.stats["oom_halvings"] >= 1 and calls[0] == 6 and max(calls[1:]) <= 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("csr_plugin")]
    assert len(warnings) == 1 and "search.max_batch_tokens is now" in warnings[0].getMessage()


def test_a_request_alone_that_does_not_fit_is_an_error(family, monkeypatch):
    model, processor = family
    engine = TransformersEngine(model, processor, SearchConfig(**SEARCH))

    def no_memory(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(TransformersEngine, "_expand", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        engine.expand(_requests(engine)[:1])


def test_other_errors_are_not_taken_for_memory(family, monkeypatch):
    model, processor = family
    engine = TransformersEngine(model, processor, SearchConfig(**SEARCH))
    monkeypatch.setattr(TransformersEngine, "_expand", lambda self, batch: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError, match="bad"):
        engine.expand(_requests(engine))
    assert engine.stats["oom_halvings"] == 0


def test_csr_sample_trees_are_the_same_shared_copied_and_with_out_of_memory(tmp_path, tiny_recipe_dict, tiny_clip,
                                                                            tiny_model_and_processor, monkeypatch):
    """Three runs of `csr sample` on 6 prompts: the engine before sharing, the shared one, and the shared
    one whose decodes of more than 2 requests run out of memory. Every prompt is sampled once in each,
    and the trees (every node's tokens) are the same."""
    import json

    from csr_plugin.config import recipe_from_dict
    from csr_plugin.sampling.local import sample

    def run(name, share):
        data = json.loads(json.dumps(tiny_recipe_dict))
        data["output_dir"] = str(tmp_path / name)
        data["search"]["batch_prompts"] = 6
        recipe = recipe_from_dict(data)
        model, processor = tiny_model_and_processor
        engine = TransformersEngine(model, processor, recipe.search)
        engine.share_prompt = share
        summary = sample(recipe, engine, tiny_clip, progress=False)
        trees = [json.loads(line) for line in (tmp_path / name / "trees.jsonl").read_text().splitlines()]
        return summary, engine, {t["id"]: [n["token_ids"] for n in t["nodes"]] for t in trees}, len(trees)

    _, _, before, n_before = run("copied", share=False)
    _, _, shared, _ = run("shared", share=True)
    real = TransformersEngine._expand

    def tight_memory(self, batch):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(self, batch)

    monkeypatch.setattr(TransformersEngine, "_expand", tight_memory)
    summary, engine, squeezed, n_squeezed = run("oom", share=True)
    assert n_before == n_squeezed == len(before) == 6 and summary.done == 6
    assert engine.stats["oom_halvings"] >= 1
    assert shared == before and squeezed == before


def test_a_kept_beam_continues_from_its_own_kv(family):
    """Step 2 continues three candidates of step 1. The engine that kept their KV prefills one token per
    beam (its last sampled one, never fed back) instead of last prompt token + prefix, and continues as the
    engine that re-prefills (copied) does."""
    model, processor = family
    image = Image.new("RGB", (48, 48), (200, 30, 30))
    steps = {}
    for share in (True, False):
        engine = TransformersEngine(model, processor, SearchConfig(**SEARCH))
        engine.share_prompt = share
        prompt = engine.encode_prompt("Describe the image.", image)
        first = engine.expand([Expansion(prompt, [], 3, seed=1)])[0]
        before = engine.stats["prefill_tokens"]
        second = engine.expand([Expansion(prompt, c.token_ids, 2, seed=2 + i) for i, c in enumerate(first)])
        steps[share] = (first, second, engine.stats["prefill_tokens"] - before, engine.stats["kept_prefixes"])
    _same([steps[True][0]], [steps[False][0]])
    _same(steps[True][1], steps[False][1])
    lengths = [len(c.token_ids) for c in steps[True][0]]
    assert steps[True][2:] == (3, 3)                          # one token per beam, all three continued
    assert steps[False][2:] == (sum(1 + n for n in lengths), 0)
