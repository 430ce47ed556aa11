"""`csr sample` with search.decoding: pargs (csr_plugin/sampling/pargs_engine.py): the engine's candidates
against a naive per-token PARGS reference with the sentence stop, their log-probs against the policy's own
forward, finish reasons, w = 0 greedy against the sampling engine's greedy, a reward model with a known
preference, `csr sample --rm` end to end and reproducible, and the config refusals."""
import dataclasses

import pytest
import torch
import yaml
from PIL import Image

from conftest import make_engine, reference_logprobs
from test_guided_decoding import _embedding_reward_model, spread_reward_model
from csr_plugin.config import ConfigError, PargsConfig, SearchConfig, recipe_from_dict
from csr_plugin.sampling.pargs_decoding import _unique_rows, guided_decode_naive
from csr_plugin.sampling.engine import Expansion, stable_seed
from csr_plugin.sampling.pargs_engine import PargsEngine

QUESTIONS = ["Describe the image.", "Is there a cat?"]
COLOURS = [(200, 30, 30), (30, 30, 200)]
SEARCH = {"beam_width": 3, "candidates": 3, "keep_top": 1, "keep_bottom": 2, "max_new_tokens": 6,
          "decoding": "pargs", "rm": "unused"}


@pytest.fixture(scope="module")
def reward_model(tiny_recipe_dict):
    """Rewards spread over several nats, so w = 2 reorders the policy's top k."""
    return spread_reward_model(tiny_recipe_dict["model"]["path"])


def _engine(policy, reward_model, pargs=None, **search):
    model, processor = policy
    cfg = SearchConfig(**{**SEARCH, **search}, pargs=PargsConfig(**(pargs or {"top_k": 4, "weight": 2.0})))
    return PargsEngine(model, processor, cfg, reward_model)


def _requests(engine, prefixes=((), (7, 11))):
    images = [Image.new("RGB", (32, 32), c) for c in COLOURS]
    return [Expansion(engine.encode_prompt(q, image), list(prefix), 3, seed=seed)
            for q, image, prefix, seed in zip(QUESTIONS, images, prefixes, (5, 6))]


def _naive(engine, requests):
    """Per candidate: full policy forward per token, full RM forward per top-k candidate, no cache."""
    prompts = [r.prompt.token_ids + r.prefix_ids for r in requests for _ in range(r.n)]
    images = [r.prompt.image_inputs for r in requests for _ in range(r.n)]
    seeds = [stable_seed(r.seed, k) for r in requests for k in range(r.n)]
    return guided_decode_naive(engine.model, engine.reward_model, prompts, images, seeds, engine.settings,
                               engine.setup)


def _expected_finish(ids, setup, max_new):
    stops = [i for i, t in enumerate(ids) if t in setup.eos_ids or t in setup.stop_ids]
    assert stops in ([], [len(ids) - 1]), ids   # nothing after the first sentence end or EOS
    if stops:
        return "eos" if ids[-1] in setup.eos_ids else "sentence"
    assert len(ids) == max_new, ids
    return "length"


@pytest.fixture(scope="module")
def stopping_delimiter(tiny_model_and_processor, reward_model):
    """A delimiter that ends candidates mid-way: the text of the 3rd token the first candidate draws
    with the real delimiters (the tiny random model seldom emits '.')."""
    engine = _engine(tiny_model_and_processor, reward_model)
    first = engine.expand(_requests(engine))[0][0].token_ids
    texts = [engine.tokenizer.decode([t]).strip() for t in first[2:]]
    return next(text for text in texts if text.isalnum())


def test_candidates_are_the_naive_pargs_tokens_with_the_policys_logprobs(tiny_model_and_processor, reward_model,
                                                                       stopping_delimiter):
    model, _ = tiny_model_and_processor
    engine = _engine(tiny_model_and_processor, reward_model, delimiters=[stopping_delimiter])
    assert engine.setup.stop_ids == set(engine.sentence_end_mask.nonzero().flatten().tolist())
    requests = _requests(engine)
    rows = [r.prompt.token_ids + r.prefix_ids for r in requests for _ in range(r.n)]
    images = [r.prompt.image_inputs for r in requests for _ in range(r.n)]
    assert _unique_rows(rows, images) == ([0, 3], [0, 0, 0, 1, 1, 1])   # one prefill per request
    got = engine.expand(requests)
    naive = iter(_naive(engine, requests))
    finishes = []
    for request, question, colour, conts in zip(requests, QUESTIONS, COLOURS, got):
        assert len(conts) == 3
        for cont in conts:
            assert cont.token_ids == next(naive)
            finishes.append(cont.finish)
            assert cont.finish == _expected_finish(cont.token_ids, engine.setup, 6)
            expected = reference_logprobs(model, engine, question, Image.new("RGB", (32, 32), colour),
                                          request.prefix_ids, cont.token_ids)
            assert cont.logprobs == pytest.approx(expected, abs=1e-5)
            assert cont.text == engine.tokenizer.decode(request.prefix_ids + cont.token_ids, skip_special_tokens=True)[
                len(engine.tokenizer.decode(request.prefix_ids, skip_special_tokens=True)):]
    # rows ended at different steps: some at the delimiter, some ran to the limit
    assert {"sentence", "length"} <= set(finishes), finishes


def test_search_temperature_scales_the_policy_term_only(tiny_model_and_processor, reward_model):
    """τ = search.temperature: score log π_τ(v) + w·r over the same top k; the reported log-probs stay log π."""
    from csr_plugin.sampling.pargs_decoding import _candidates

    logits = torch.randn(3, 50)
    banned = torch.zeros(50, dtype=torch.bool)
    banned[7] = True
    score, ids, logp = _candidates(logits, banned, 5, temperature=0.5)
    assert torch.equal(ids, logits.masked_fill(banned, float("-inf")).topk(5).indices)
    assert torch.allclose(score, (logits / 0.5).log_softmax(-1).gather(-1, ids))
    assert torch.allclose(logp, logits.log_softmax(-1).gather(-1, ids))
    model, _ = tiny_model_and_processor
    engine = _engine(tiny_model_and_processor, reward_model, temperature=0.5, max_new_tokens=4)
    assert engine.settings.temperature == 0.5
    request = _requests(engine)[1]
    request.n = 2
    got = engine.expand([request])[0]
    assert [c.token_ids for c in got] == _naive(engine, [request])
    for cont in got:
        expected = reference_logprobs(model, engine, QUESTIONS[1], Image.new("RGB", (32, 32), COLOURS[1]),
                                      request.prefix_ids, cont.token_ids)
        assert cont.logprobs == pytest.approx(expected, abs=1e-5)


def test_finish_reasons_sentence_eos_and_length(tiny_model_and_processor, reward_model, stopping_delimiter):
    engine = _engine(tiny_model_and_processor, reward_model)
    requests = _requests(engine)
    free = engine.expand(requests)
    # a token that request 1's second candidate draws, and no candidate of request 0, is declared an extra EOS
    seen0 = {t for c in free[0] for t in c.token_ids}
    eos_token = next(t for t in free[1][1].token_ids[1:] if t not in seen0)
    engine_stop = _engine(tiny_model_and_processor, reward_model, delimiters=[stopping_delimiter])
    engine_stop.setup = dataclasses.replace(engine_stop.setup, eos_ids=engine_stop.setup.eos_ids | {eos_token})
    got = engine_stop.expand(requests)
    # max_new_tokens is search.max_new_tokens
    short = _engine(tiny_model_and_processor, reward_model, max_new_tokens=3).expand(requests)
    finishes = []
    for setup, limit, result in ((engine_stop.setup, 6, got), (engine.setup, 3, short)):
        for conts, free_conts in zip(result, free):
            for cont, before in zip(conts, free_conts):
                finishes.append(cont.finish)
                assert cont.finish == _expected_finish(cont.token_ids, setup, limit)
                assert before.token_ids[:len(cont.token_ids)] == cont.token_ids   # a stop only cuts the same draw
                if cont.finish == "sentence":
                    assert stopping_delimiter in engine.tokenizer.decode([cont.token_ids[-1]])
    assert got[1][1].finish == "eos" and got[1][1].token_ids[-1] == eos_token
    assert set(finishes) == {"sentence", "eos", "length"}, finishes
    assert all(c.finish == "sentence" for c in got[0])   # request 0 never draws the new EOS


def test_greedy_with_weight_zero_is_the_greedy_policy_continuation(tiny_model_and_processor, reward_model,
                                                                   stopping_delimiter):
    """w = 0, greedy: every candidate is the sampling engine's greedy sentence (group beam search, no penalty)."""
    delimiters = [stopping_delimiter]
    engine = _engine(tiny_model_and_processor, reward_model, pargs={"top_k": 4, "weight": 0.0, "greedy": True},
                     delimiters=delimiters)
    greedy = make_engine(tiny_model_and_processor, decoding="group_beam", diversity_penalty=0.0, max_new_tokens=6,
                         delimiters=delimiters)
    requests = _requests(engine)
    got, want = engine.expand(requests), greedy.expand(requests)
    for conts, wants in zip(got, want):
        for cont, ref in zip(conts, wants):
            assert (cont.token_ids, cont.finish, cont.text) == (ref.token_ids, ref.finish, ref.text)
            assert cont.logprobs == pytest.approx(ref.logprobs, abs=1e-5)


def test_a_reward_model_that_favours_a_token_puts_it_into_the_candidates(tiny_model_and_processor, reward_model,
                                                                        tiny_recipe_dict):
    plain = _engine(tiny_model_and_processor, reward_model, pargs={"top_k": 6, "weight": 0.0})
    requests = _requests(plain)
    before = plain.expand(requests)
    with torch.no_grad():   # the policy's 6th choice for the first token of request 0
        logp = plain.model(input_ids=torch.tensor([requests[0].prompt.token_ids]),
                           **requests[0].prompt.image_inputs).logits[0, -1].log_softmax(-1)
    favourite = int(logp.masked_fill(plain.banned_mask, float("-inf")).topk(6).indices[-1])
    rm = _embedding_reward_model(tiny_recipe_dict["model"]["path"], favourite, scale=20.0)
    steered = _engine(tiny_model_and_processor, rm, pargs={"top_k": 6, "weight": 2.0}).expand(requests)
    assert all(c.token_ids[0] == favourite for c in steered[0])
    assert not all(c.token_ids[0] == favourite for c in before[0])
    count = lambda result: sum(c.token_ids.count(favourite) for conts in result for c in conts)  # noqa: E731
    assert count(steered) > count(before)


def _write_rm(reward_model, path, folder):
    from transformers import AutoProcessor

    from csr_plugin.reward_model.model import write_reward_model

    state = reward_model.state_dict()
    write_reward_model(folder, reward_model.backbone, AutoProcessor.from_pretrained(path),
                       {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                       {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}, "mlp2", {})
    return folder


def test_csr_sample_rm_writes_pargs_trees_reproducibly(tiny_recipe_dict, reward_model, tiny_clip, tmp_path,
                                                       monkeypatch):
    from csr_plugin.cli import main
    from csr_plugin.jsonl import load_records
    from csr_plugin.sampling import local

    rm_dir = _write_rm(reward_model, tiny_recipe_dict["model"]["path"], tmp_path / "rm")
    search = {"beam_width": 2, "candidates": 2, "keep_top": 1, "keep_bottom": 1, "max_sentences": 2,
              "max_new_tokens": 5, "pargs": {"top_k": 3}}
    recipe = {**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"], "limit": 2}, "output_dir": str(tmp_path / "a"),
              "search": search}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["sample", "--config", str(tmp_path / "r.yaml"), "--rm", str(rm_dir), "--quiet"]) == 0
    cli_trees = load_records(tmp_path / "a" / "trees.jsonl")

    # the same recipe through sample(), with the engine build_engine makes, watched
    pargs = recipe_from_dict({**recipe, "output_dir": str(tmp_path / "b"),
                              "search": {**search, "decoding": "pargs", "rm": str(rm_dir)}})
    drawn = []
    real_build = local.build_engine

    def watched(r):
        engine = real_build(r)
        assert isinstance(engine, PargsEngine)
        expand = engine.expand

        def recording(requests):
            out = expand(requests)
            drawn.extend(out)
            return out
        engine.expand = recording
        return engine
    monkeypatch.setattr(local, "build_engine", watched)
    local.sample(pargs, clip=tiny_clip, progress=False)
    trees = load_records(tmp_path / "b" / "trees.jsonl")
    assert len(trees) == 2 and trees == cli_trees   # `csr sample --rm` and a rerun: the same trees
    from_engine = {(tuple(c.token_ids), c.text) for conts in drawn for c in conts}
    nodes = [n for tree in trees for n in tree["nodes"] if n["parent"] is not None]
    assert nodes and all((tuple(n["token_ids"]), n["text"]) in from_engine for n in nodes)
    monkeypatch.undo()
    # plain sampling draws other sentences
    local.sample(recipe_from_dict({**recipe, "output_dir": str(tmp_path / "c")}), clip=tiny_clip, progress=False)
    sampled = load_records(tmp_path / "c" / "trees.jsonl")
    assert [n["token_ids"] for t in sampled for n in t["nodes"]] != [n["token_ids"] for t in trees for n in t["nodes"]]


def test_pargs_config_refusals(tmp_path, tiny_recipe_dict, capsys, monkeypatch):
    from csr_plugin.cli import main
    from csr_plugin.sampling.ray_actors import actor_recipe
    from csr_plugin.sampling.ray_driver import sample_on_ray
    from csr_plugin.sampling.vllm_engine import _reject_group_beam

    with pytest.raises(ConfigError, match=r"`search.decoding` is pargs: set `search.rm` \(or `csr sample --rm`\)"):
        recipe_from_dict({"search": {"decoding": "pargs"}})
    with pytest.raises(ConfigError, match=r"`search.decoding: pargs` needs `search.engine: transformers`"):
        recipe_from_dict({"search": {"decoding": "pargs", "rm": "x", "engine": "vllm"}})
    with pytest.raises(ConfigError, match=r"`search.pargs.top_k` must be >= 1"):
        recipe_from_dict({"search": {"decoding": "pargs", "rm": "x", "pargs": {"top_k": 0}}})
    cfg = recipe_from_dict({"search": {"decoding": "pargs", "rm": "x"}}).search
    assert (cfg.pargs.top_k, cfg.pargs.weight, cfg.pargs.greedy) == (10, 2.0, False)
    assert recipe_from_dict({}).search.decoding == "sample"
    with pytest.raises(ValueError, match="pargs is not available on vLLM"):
        _reject_group_beam(cfg)
    with pytest.raises(ConfigError, match=r"pargs cannot run on OpenRLHF's vLLM rollout actors \(--openrlhf\)"):
        sample_on_ray(recipe_from_dict({"search": {"decoding": "pargs", "rm": "x"}}), 1, openrlhf_engines=True)
    # Ray actors run in Ray's own folder: search.rm goes to them as an absolute path
    (tmp_path / "rm").mkdir()
    monkeypatch.chdir(tmp_path)
    sent = actor_recipe(recipe_from_dict({"search": {"decoding": "pargs", "rm": "rm"}}))
    assert sent["search"]["rm"] == str((tmp_path / "rm").resolve()) and sent["search"]["decoding"] == "pargs"
    # a folder that is no reward model: refused naming search.rm, before any model loads
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**tiny_recipe_dict, "output_dir": str(tmp_path / "out")}))
    assert main(["sample", "--config", str(tmp_path / "r.yaml"), "--rm", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert f"search.rm {str(tmp_path / 'nothing')!r} holds no reward_model.json" in capsys.readouterr().err
