"""search.engine: vllm, through a transformers-backed stand-in for the vllm package.

vLLM needs CUDA, so the stand-in under tests/stand_in_vllm (put on sys.path only
by the ``vllm`` fixture) runs the tiny HF model behind vLLM's interface.
"""
import asyncio
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_engine, reference_logprobs
from csr_plugin.config import CurationConfig, ModelConfig, RewardConfig, SearchConfig, recipe_from_dict
from csr_plugin.sampler.engine import Expansion
from csr_plugin.sampler.search import PromptJob, SentenceBeamSearch
from csr_plugin.sampler.sentence_end import sentence_end_token_ids
from csr_plugin.sampler.transformers_engine import PromptTooLongError
from csr_plugin.sampler.vllm_engine import VllmEngine, VllmSentenceRules

STAND_IN = Path(__file__).resolve().parent / "stand_in_vllm"
SEARCH = {"beam_width": 3, "candidates": 3, "keep_top": 1, "keep_bottom": 2, "max_new_tokens": 12}


def _vllm_modules():
    return [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]


@pytest.fixture
def vllm(monkeypatch):
    """The stand-in vllm package, importable for this test only."""
    for name in _vllm_modules():
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(STAND_IN))
    import vllm

    assert Path(vllm.__file__).is_relative_to(STAND_IN)
    yield vllm
    for name in _vllm_modules():
        del sys.modules[name]


def _image(colour=(200, 30, 30)):
    return Image.new("RGB", (48, 48), colour)


def _engine(vllm, model_and_processor, **search):
    model, processor = model_and_processor
    return VllmEngine(vllm.LLM.from_loaded(model, processor), processor, SearchConfig(**{**SEARCH, **search}))


def test_the_module_imports_without_vllm_and_building_names_the_fix(monkeypatch):
    import csr_plugin.sampler

    monkeypatch.setitem(sys.modules, "vllm", None)   # as if vllm were not installed
    # import the module afresh; the one other tests use comes back afterwards
    monkeypatch.delitem(sys.modules, "csr_plugin.sampler.vllm_engine")
    monkeypatch.setattr(csr_plugin.sampler, "vllm_engine", csr_plugin.sampler.vllm_engine)
    import csr_plugin.sampler.vllm_engine as fresh   # would raise here if it imported vllm at import time

    with pytest.raises(ImportError, match=r"pip install vllm \(needs a CUDA GPU\); or set search.engine: "
                                          "transformers"):
        fresh.import_vllm()


def test_sampling_params_carry_the_expansion_stops_and_bans(vllm, tiny_model_and_processor):
    engine = _engine(vllm, tiny_model_and_processor, temperature=0.8, top_p=0.95)
    tok = tiny_model_and_processor[1].tokenizer
    prompt = engine.encode_prompt("Describe the image.", _image())
    params = engine.rules.sampling_params(Expansion(prompt, [], 5, seed=123))
    assert isinstance(params, vllm.SamplingParams)
    assert (params.n, params.seed, params.max_tokens) == (5, 123, 12)
    assert (params.temperature, params.top_p) == (0.8, 0.95)
    # sentence ends of this tokenizer, EOS excluded: vLLM stops at EOS by itself and reports it apart
    assert params.stop_token_ids == sorted(sentence_end_token_ids(tok, [".", "!", "?"]) - {tok.eos_token_id})
    assert tok.convert_tokens_to_ids(".") in params.stop_token_ids
    assert (params.logprobs, params.min_tokens, params.skip_special_tokens) == (0, 0, True)
    # the tiny tokenizer's special tokens <pad> <s> <image>, all but EOS </s>
    banned = {tok.pad_token_id, tok.bos_token_id, tok.convert_tokens_to_ids("<image>")}
    assert params.logit_bias == {i: -100.0 for i in banned}
    assert tok.eos_token_id not in params.logit_bias
    assert engine.rules.eos_ids == {tok.eos_token_id}


def test_an_openrlhf_base_keeps_its_sampling_and_is_not_modified(vllm, tiny_model_and_processor):
    engine = _engine(vllm, tiny_model_and_processor)
    # OpenRLHF's rollout params: its own temperature, top-p, top-k, min_tokens=1, logprobs=1, specials kept
    base = vllm.SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=1024, min_tokens=1, logprobs=1,
                               skip_special_tokens=False)
    params = engine.rules.sampling_params(Expansion(engine.encode_prompt("Hi?", _image()), [], 4, seed=9), base=base)
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 50)
    assert (params.n, params.seed, params.max_tokens, params.logprobs, params.min_tokens) == (4, 9, 12, 0, 0)
    assert params.stop_token_ids and params.logit_bias and params.skip_special_tokens
    assert base == vllm.SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=1024, min_tokens=1,
                                       logprobs=1, skip_special_tokens=False)


def test_group_beam_is_refused_with_the_fix(vllm, tiny_model_and_processor):
    engine = _engine(vllm, tiny_model_and_processor, decoding="group_beam")
    request = Expansion(engine.encode_prompt("Describe the image.", _image()), [], 2)
    with pytest.raises(ValueError, match="use decoding: sample or engine: transformers"):
        engine.rules.sampling_params(request)
    with pytest.raises(ValueError, match="no diverse group beam search"):
        VllmEngine.from_config(ModelConfig(path="unused"), SearchConfig(**SEARCH, decoding="group_beam"))


def _completion(vllm, index, token_ids, finish_reason, stop_reason):
    # Each step's dict also holds another token, as with logprobs > 0: the sampled one must be picked.
    logprobs = [{t: vllm.Logprob(-0.5 - k), t + 1: vllm.Logprob(-9.0)} for k, t in enumerate(token_ids)]
    return vllm.CompletionOutput(index=index, text="unused", token_ids=token_ids, cumulative_logprob=None,
                                 logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason)


def test_continuations_map_finish_reasons_and_text(vllm, tiny_model_and_processor):
    tok = tiny_model_and_processor[1].tokenizer
    search = SearchConfig(**SEARCH)
    rules = VllmSentenceRules(tok, search, eos_ids={tok.eos_token_id}, banned_ids=set())
    prefix = tok.encode("There is a red circle.", add_special_tokens=False)
    words = tok.encode(" The green triangle", add_special_tokens=False)
    period, eos = tok.convert_tokens_to_ids("."), tok.eos_token_id
    outputs = [  # out of index order: continuations must follow the candidate index
        _completion(vllm, 3, words + [period], "length", None),    # a sentence end on the last allowed token
        _completion(vllm, 0, words + [eos], "stop", None),         # EOS: stop_reason None
        _completion(vllm, 2, words, "length", None),
        _completion(vllm, 1, words + [period], "stop", period),
    ]
    request_output = vllm.RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                                        outputs=outputs, finished=True)
    conts = rules.continuations(request_output, prefix)
    assert [c.finish for c in conts] == ["eos", "sentence", "length", "sentence"]
    assert [c.token_ids for c in conts] == [words + [eos], words + [period], words, words + [period]]
    assert conts[0].logprobs == [-0.5 - k for k in range(len(words) + 1)]
    assert conts[0].text == " The green triangle"    # the EOS adds no text
    assert conts[1].text == " The green triangle."
    assert tok.decode(prefix) + conts[1].text == tok.decode(prefix + words + [period])


def test_an_eos_the_rules_do_not_list_still_finishes_as_eos(vllm, tiny_model_and_processor):
    tok = tiny_model_and_processor[1].tokenizer
    rules = VllmSentenceRules(tok, SearchConfig(**SEARCH), eos_ids={tok.eos_token_id}, banned_ids=set())
    words = tok.encode(" It is big", add_special_tokens=False)
    output = vllm.RequestOutput("r", None, [1], None, [_completion(vllm, 0, words, "stop", None)], True)
    assert rules.continuations(output, [])[0].finish == "eos"


def test_encode_prompt_leaves_one_image_placeholder_and_checks_the_expanded_length(vllm, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    engine = _engine(vllm, tiny_model_and_processor)
    assert engine.max_context == 1024   # the tiny model's max_position_embeddings, as vLLM's max_model_len
    vllm_prompt = engine.encode_prompt("Describe the image.", _image())
    hf_ids = make_engine(tiny_model_and_processor).encode_prompt("Describe the image.", _image()).token_ids
    assert vllm_prompt.token_ids.count(image_id) == 1 and hf_ids.count(image_id) == 16   # (32 / 8)^2 patches
    at = hf_ids.index(image_id)
    assert vllm_prompt.token_ids == hf_ids[:at + 1] + hf_ids[at + 16:]
    assert vllm_prompt.image_inputs["image"].size == (48, 48)
    # the search's context guard counts the prompt as vLLM will expand it
    assert vllm_prompt.length == len(hf_ids) != len(vllm_prompt.token_ids)
    # room for the unexpanded prompt but not for the expanded one: the expanded length counts
    fits_unexpanded = engine.max_context - len(vllm_prompt.token_ids)
    tight = _engine(vllm, tiny_model_and_processor, max_new_tokens=fits_unexpanded)
    with pytest.raises(PromptTooLongError, match=f"prompt is {len(hf_ids)} tokens with its image"):
        tight.encode_prompt("Describe the image.", _image())


def test_expand_stops_right_and_reports_raw_logprobs(vllm, tiny_model_and_processor):
    """Tolerance 1e-4 (fp32): the stand-in's batched KV cache changes only rounding. Temperature 1.5 and
    top-p 0.9 change what is sampled, never the reported log-probs."""
    model, processor = tiny_model_and_processor
    tok = processor.tokenizer
    engine = _engine(vllm, tiny_model_and_processor, max_new_tokens=10, temperature=1.5, top_p=0.9)
    hf_engine = make_engine(tiny_model_and_processor)
    questions = ["Describe the image.", "What shapes do you see in this picture?"]
    colours = [(200, 30, 30), (0, 0, 255)]
    prefixes = [[], tok.encode("There is a red circle.", add_special_tokens=False)]
    requests = [Expansion(engine.encode_prompt(q, _image(c)), p, 16, seed=s)
                for s, (q, c, p) in enumerate(zip(questions, colours, prefixes))]
    results = engine.expand(requests)
    assert [len(r) for r in results] == [16, 16]
    rules, finishes = engine.rules, set()
    for request, question, colour, conts in zip(requests, questions, colours, results):
        for cont in conts:
            finishes.add(cont.finish)
            assert not any(t in rules.stop_ids or t in rules.eos_ids for t in cont.token_ids[:-1]), "stopped late"
            last = cont.token_ids[-1]
            expected_finish = ("eos" if last in rules.eos_ids else "sentence" if last in rules.stop_ids
                               else "length")
            assert cont.finish == expected_finish
            if cont.finish == "length":
                assert len(cont.token_ids) == 10
            assert not set(cont.token_ids) & rules.banned_ids, "generated a special token"
            assert cont.text == tok.decode(request.prefix_ids + cont.token_ids, skip_special_tokens=True)[
                len(tok.decode(request.prefix_ids, skip_special_tokens=True)):]
            expected = reference_logprobs(model, hf_engine, question, _image(colour), request.prefix_ids,
                                           cont.token_ids)
            assert cont.logprobs == pytest.approx(expected, abs=1e-4)
    # The random tiny model is near uniform: 4 of its 393 tokens end a sentence, so ~10% of 10-token samples
    # do; these seeds give both.
    assert {"sentence", "length"} <= finishes


def test_a_requests_samples_do_not_depend_on_its_batch(vllm, tiny_model_and_processor):
    engine = _engine(vllm, tiny_model_and_processor)
    a = Expansion(engine.encode_prompt("Describe the image.", _image()), [], 3, seed=11)
    b = Expansion(engine.encode_prompt("What objects are in the picture?", _image((0, 200, 0))), [5, 6], 3, seed=12)
    together = engine.expand([a, b])[1]
    alone = engine.expand([b])[0]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in alone}) > 1   # candidates k draw with seed + k, not one seed
    other_seed = engine.expand([Expansion(b.prompt, b.prefix_ids, 3, seed=13)])[0]
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in alone]


def test_sentence_beam_search_runs_over_the_vllm_engine(vllm, tiny_model_and_processor, tiny_clip):
    tok = tiny_model_and_processor[1].tokenizer
    search = SearchConfig(**{**SEARCH, "max_new_tokens": 8}, max_sentences=2)
    engine = VllmEngine(vllm.LLM.from_loaded(*tiny_model_and_processor), tiny_model_and_processor[1], search)
    jobs = []
    for i, (question, colour) in enumerate([("Describe the image.", (200, 30, 30)),
                                            ("What objects are in the picture?", (0, 90, 200))]):
        image = _image(colour)
        jobs.append(PromptJob(f"v{i}", f"vllm-engine-test-{i}.png", question, image,
                              engine.encode_prompt(question, image)))
    trees = SentenceBeamSearch(engine, tiny_clip, search, RewardConfig(), CurationConfig()).run(jobs)
    assert [t.id for t in trees] == ["v0", "v1"]
    for tree in trees:
        assert any(node.parent not in (None, 0) for node in tree.nodes), "the search never got past sentence 1"
        json.dumps(tree.to_json())
        for node in tree.nodes[1:]:
            path, at = [], node
            while at.parent is not None:
                path.append(at)
                at = tree.nodes[at.parent]
            path.reverse()
            ids = [t for n in path for t in n.token_ids]
            # a response's token ids decode to the concatenation of its sentences' texts
            assert tok.decode(ids, skip_special_tokens=True) == "".join(n.text for n in path)
            assert node.r_t == pytest.approx(sum(node.logprobs) / len(node.logprobs))
            assert node.finish in {"sentence", "eos", "length", "max_sentences", "context"}


def test_build_engine_for_a_vllm_recipe(vllm, monkeypatch, tiny_recipe_dict):
    from csr_plugin.sampling import build_engine

    built, stand_in_llm = [], vllm.LLM

    def recording_llm(**kwargs):   # records what vllm.LLM receives, then loads the checkpoint as it would
        built.append(kwargs)
        return stand_in_llm(**kwargs)

    monkeypatch.setattr(vllm, "LLM", recording_llm)
    data = json.loads(json.dumps(tiny_recipe_dict))
    data["search"].update(engine="vllm", seed=7)
    recipe = recipe_from_dict(data)
    engine = build_engine(recipe)
    assert isinstance(engine, VllmEngine) and engine.llm.engine_kwargs["enable_prefix_caching"]
    assert built == [{"model": recipe.model.path, "dtype": "float32", "trust_remote_code": False,
                      "enable_prefix_caching": True, "limit_mm_per_prompt": {"image": 1}, "seed": 7}]
    conts = engine.expand([Expansion(engine.encode_prompt("Describe the image.", _image()), [], 2, seed=1)])[0]
    assert len(conts) == 2


def test_the_async_stand_in_answers_like_openrlhfs_rollout_actor(vllm, tiny_model_and_processor):
    engine = _engine(vllm, tiny_model_and_processor)
    prompt = engine.encode_prompt("Describe the image.", _image())
    params = engine.rules.sampling_params(Expansion(prompt, [], 2, seed=5), sampling_params_cls=vllm.SamplingParams)
    async_engine = vllm.AsyncStandInEngine(engine.llm)
    output = asyncio.run(async_engine.generate(prompt.token_ids, params, multi_modal_data=prompt.image_inputs))
    sync = engine.llm.generate([{"prompt_token_ids": prompt.token_ids, "multi_modal_data": prompt.image_inputs}],
                               [params], use_tqdm=False)[0]
    assert [o.token_ids for o in output.outputs] == [o.token_ids for o in sync.outputs]
    assert len(output.prompt_token_ids) == len(prompt.token_ids) + 15   # the placeholder became 16 image tokens


def test_the_stand_in_is_gone_after_its_fixture():
    assert str(STAND_IN) not in sys.path
    assert not any(Path(getattr(sys.modules[name], "__file__", None) or "/").is_relative_to(STAND_IN)
                   for name in _vllm_modules())
