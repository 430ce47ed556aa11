"""PARGS reward-guided decoding (csr_plugin/sampling/pargs_decoding.py): the batched, KV-cached decoder
against the naive one-forward-per-candidate reference, w = 0 against the policy alone, a reward model
with a known preference, and `csr eval --rm`."""
import json
import types

import pytest
import torch
from PIL import Image

from csr_plugin.config import ConfigError, recipe_from_dict
from csr_plugin.multimodal import chat_prompt, encode_prompt
from csr_plugin.sampling.pargs_decoding import (DecodeSetup, PargsSettings, check_models, guided_decode,
                                            guided_decode_naive, setup_for)
from csr_plugin.reward_model.model import MultimodalRewardModel

QUESTIONS = ["Describe the image.", "What objects are in the picture? Describe each of them.", "Is there a cat?"]
COLOURS = [(200, 30, 30), (30, 30, 200), (30, 160, 60)]


@pytest.fixture(scope="module")
def policy(tiny_model_and_processor):
    return tiny_model_and_processor


def spread_reward_model(path) -> MultimodalRewardModel:
    """A reward model on the tiny LLaVA whose rewards spread over several nats: a head scaled up from the
    random init (std 1/sqrt(65)) by 30, so w = 2 reorders the policy's top-k and the test sees it."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(1)
    backbone = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model = MultimodalRewardModel(backbone, "mlp2").eval()
    with torch.no_grad():
        model.head[2].weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def reward_model(tiny_recipe_dict):
    return spread_reward_model(tiny_recipe_dict["model"]["path"])


@pytest.fixture(scope="module")
def prompts(policy):
    _, processor = policy
    encoded = [encode_prompt(processor, chat_prompt(processor, q), Image.new("RGB", (32, 32), c))
               for q, c in zip(QUESTIONS, COLOURS)]
    assert len({len(ids) for ids, _ in encoded}) == 3   # unequal lengths: the batch is left-padded
    return [ids for ids, _ in encoded], [images for _, images in encoded]


def _run(decode, policy, reward_model, prompts, settings, setup, seeds=(11, 12, 13), **kwargs):
    model, _ = policy
    ids, images = prompts
    return decode(model, reward_model, ids, images, list(seeds), settings, setup, **kwargs)


@pytest.mark.parametrize("sharing", ["mask", "expand"])
@pytest.mark.parametrize("greedy", [False, True])
def test_incremental_decoding_gives_exactly_the_naive_tokens(greedy, sharing, policy, reward_model, prompts):
    model, processor = policy
    setup = setup_for(processor, model)
    settings = PargsSettings(top_k=4, weight=2.0, greedy=greedy, max_new_tokens=10)
    first = _run(guided_decode, policy, reward_model, prompts, settings, setup, sharing=sharing)
    # A token the decoder emits at step 3 of row 0 is declared an extra EOS, so rows end at different steps
    # and finished rows leave the batch while the others go on (the tiny random model seldom emits </s>).
    stop = first[0][3]
    setup = DecodeSetup(eos_ids=setup.eos_ids | {stop}, pad_id=setup.pad_id, banned_ids=setup.banned_ids)
    fast = _run(guided_decode, policy, reward_model, prompts, settings, setup, sharing=sharing)
    naive = _run(guided_decode_naive, policy, reward_model, prompts, settings, setup)
    assert fast == naive
    lengths = [len(row) for row in fast]
    assert lengths[0] <= 4 and max(lengths) == 10, lengths   # one row stopped early, one ran to the limit
    # the reward model changes the tokens (else this test could not tell a decoder that ignores it)
    unguided = _run(guided_decode, policy, reward_model, prompts, PargsSettings(4, 0.0, greedy, 10), setup)
    assert unguided != fast
    if not greedy:   # the seeds matter: other seeds draw other tokens
        assert _run(guided_decode, policy, reward_model, prompts, settings, setup, seeds=(1, 2, 3)) != fast


def test_greedy_with_weight_zero_is_the_policy_argmax_decode(policy, reward_model, prompts):
    model, processor = policy
    setup = setup_for(processor, model)
    ids, images = prompts
    got = _run(guided_decode, policy, reward_model, prompts, PargsSettings(4, 0.0, True, 8), setup)
    for row, (prompt, image_inputs) in enumerate(zip(ids, images)):
        out = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **image_inputs,
                             max_new_tokens=8, do_sample=False, pad_token_id=setup.pad_id,
                             eos_token_id=sorted(setup.eos_ids))
        assert got[row] == out[0, len(prompt):].tolist()


def test_sampling_with_weight_zero_draws_from_the_policys_top_k(policy, reward_model, prompts):
    """First token of 1,200 rows (one prompt, seeds 0..1199): frequencies match π renormalised over its top 4."""
    model, processor = policy
    setup = setup_for(processor, model)
    ids, images = prompts
    n, k = 1200, 4
    got = guided_decode(model, reward_model, [ids[0]] * n, [images[0]] * n, list(range(n)),
                        PargsSettings(k, 0.0, False, 1), setup)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids[0]]), **images[0]).logits[0, -1].log_softmax(-1)
    top = logp.topk(k)
    expected = (top.values - top.values.logsumexp(0)).exp()
    counts = torch.tensor([sum(row[0] == t for row in got) for t in top.indices.tolist()], dtype=torch.float)
    assert counts.sum() == n   # nothing outside the top k
    # 4.5 binomial standard deviations (about 1e-5 two-sided per token): a wrong distribution, e.g. the
    # full-vocabulary softmax or uniform over k, lies far outside this on these probabilities
    sigma = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 4.5 * sigma).all(), (counts / n, expected)
    assert expected.max() < 0.9   # the check has teeth: no single token takes nearly all the mass


def _embedding_reward_model(path, favourite: int, scale: float) -> MultimodalRewardModel:
    """A reward model whose reward of a candidate is known: every layer's output projections are zeroed,
    so the last hidden state is RMSNorm(embedding of the last token) (norm weight 1: norm sqrt(d) for
    every token), and the linear head points at the favourite's: r(v) = scale * cos(e_v, e_favourite),
    largest for the favourite alone (Cauchy-Schwarz), whatever the prefix."""
    from transformers import AutoModelForImageTextToText

    backbone = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model = MultimodalRewardModel(backbone, "linear").eval()
    lm = backbone.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        target = lm.norm(lm.embed_tokens.weight[favourite])
        model.head.weight.copy_(scale * target / target.norm() / target.norm())
        model.head.bias.zero_()
    return model


def test_a_reward_model_that_prefers_one_token_steers_decoding_to_it(policy, prompts, tiny_recipe_dict):
    model, processor = policy
    setup = setup_for(processor, model)
    ids, images = prompts
    k, w = 6, 2.0
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids[0]]), **images[0]).logits[0, -1].log_softmax(-1)
    banned = torch.tensor([i in setup.banned_ids for i in range(logp.shape[0])])
    top = logp.masked_fill(banned, float("-inf")).topk(k)
    favourite = int(top.indices[-1])   # the policy's 6th choice after prompt 0
    rm = _embedding_reward_model(tiny_recipe_dict["model"]["path"], favourite, scale=20.0)
    # the preference is what the construction says, read through the reward model's own forward
    with torch.no_grad():
        rewards = rm(input_ids=torch.tensor([ids[0] + [t] for t in top.indices.tolist()]),
                     attention_mask=torch.ones(k, len(ids[0]) + 1, dtype=torch.long),
                     pixel_values=torch.cat([images[0]["pixel_values"]] * k))
    assert rewards[-1] == pytest.approx(20.0, rel=1e-4) and bool((rewards[:-1] < rewards[-1]).all())
    # so π' = softmax(log π + w r) over the top 6 puts nearly all its mass on the favourite at step 0
    assert (top.values + w * rewards).softmax(0)[-1] > 0.999
    for greedy in (True, False):
        got = guided_decode(model, rm, ids, images, [5, 6, 7], PargsSettings(k, w, greedy, 5), setup)
        assert got[0][0] == favourite, (greedy, got[0])
        plain = guided_decode(model, rm, ids, images, [5, 6, 7], PargsSettings(k, 0.0, greedy, 5), setup)
        assert plain[0][0] != favourite
        assert sum(row.count(favourite) for row in got) > sum(row.count(favourite) for row in plain)


def test_unsupported_families_and_bad_settings_are_refused(policy, reward_model):
    model, _ = policy
    mllama = types.SimpleNamespace(config=types.SimpleNamespace(model_type="mllama"))
    with pytest.raises(ValueError, match="'mllama' is not a supported VLM family; supported: llava"):
        check_models(mllama, reward_model, PargsSettings())
    qwen_rm = types.SimpleNamespace(backbone=types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen2_vl")))
    with pytest.raises(ValueError, match="backbone family differs from the policy's"):
        check_models(model, qwen_rm, PargsSettings())
    with pytest.raises(ValueError, match="top_k"):
        check_models(model, reward_model, PargsSettings(top_k=0))
    with pytest.raises(ValueError, match="sharing must be one of mask, expand"):
        guided_decode(model, reward_model, [[1]], [{}], [0], PargsSettings(), DecodeSetup({2}, 0), sharing="copy")


def test_eval_config_needs_a_reward_model_for_pargs():
    with pytest.raises(ConfigError, match=r"`eval.decoding` is pargs: set `eval.rm`"):
        recipe_from_dict({"eval": {"decoding": "pargs"}})
    with pytest.raises(ConfigError, match=r"`eval.pargs.top_k` must be >= 1"):
        recipe_from_dict({"eval": {"decoding": "pargs", "rm": "x", "pargs": {"top_k": 0}}})
    cfg = recipe_from_dict({"eval": {"decoding": "pargs", "rm": "x"}}).eval
    assert (cfg.pargs.top_k, cfg.pargs.weight, cfg.pargs.greedy) == (10, 2.0, False)   # the paper's sampling


def test_csr_eval_with_rm_decodes_with_pargs(policy, reward_model, tiny_recipe_dict, tmp_path):
    import yaml
    from transformers import AutoProcessor

    from csr_plugin.cli import main
    from csr_plugin.sampling.pargs_decoding import decode_prompts
    from csr_plugin.reward_model.model import load_reward_model, write_reward_model
    from csr_plugin.sampling.engine import stable_seed

    path = tiny_recipe_dict["model"]["path"]
    state = reward_model.state_dict()
    write_reward_model(tmp_path / "rm", reward_model.backbone, AutoProcessor.from_pretrained(path),
                       {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                       {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}, "mlp2", {})
    prompts, truth = [], []
    for i, colour in enumerate(COLOURS[:2]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        prompts.append({"id": f"e{i}", "image": str(tmp_path / f"{i}.png"), "question": QUESTIONS[i]})
        truth.append({"id": f"e{i}", "objects": ["circle"]})
    for name, rows in (("prompts", prompts), ("truth", truth)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "vocab.json").write_text(json.dumps({"objects": {"circle": ["circle"], "square": ["square"]}}))
    recipe = {"model": tiny_recipe_dict["model"],
              "eval": {"prompts": str(tmp_path / "prompts.jsonl"), "truth": str(tmp_path / "truth.jsonl"),
                       "vocabulary": str(tmp_path / "vocab.json"), "batch": 2, "max_new_tokens": 6,
                       "pargs": {"top_k": 4}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["eval", "--config", str(tmp_path / "r.yaml"), "--rm", str(tmp_path / "rm"),
                 "--out", str(tmp_path / "out.json")]) == 0
    got = [s["response"] for s in json.loads((tmp_path / "out.json").read_text())["samples"]]

    model, processor = policy
    items = [(Image.open(p["image"]).convert("RGB"), p["question"]) for p in prompts]
    expected = decode_prompts(model, load_reward_model(tmp_path / "rm"), processor, items,
                              [stable_seed(0, "pargs", p["id"]) for p in prompts], PargsSettings(4, 2.0, False, 6), 2)
    assert got == expected and all(got)


@pytest.mark.parametrize("sharing", ["mask", "expand"])
def test_each_candidate_reward_equals_a_full_forward_of_its_sequence(sharing, reward_model, prompts, policy):
    """Two steps on a left-padded batch of 2: every candidate's reward, and after keeping a chosen one,
    every next candidate's, equal the reward model's own uncached forward over prompt + tokens."""
    from csr_plugin.multimodal import batch_inputs
    from csr_plugin.sampling.pargs_decoding import _candidates_expanded, _candidates_side_by_side
    from csr_plugin.reward_model.model import _hf_model

    model, processor = policy
    pad = setup_for(processor, model).pad_id
    ids, images = prompts[0][:2], prompts[1][:2]
    step_fn = _candidates_side_by_side if sharing == "mask" else _candidates_expanded
    inner = _hf_model(reward_model.backbone).model
    kwargs = batch_inputs(model.config, ids, images, pad)
    kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = inner(**kwargs, use_cache=True).past_key_values
        attention, next_pos = kwargs["attention_mask"], torch.tensor([len(r) for r in ids])
        prefixes = [[], []]
        for cand, pick in ((torch.tensor([[5, 9, 40], [7, 5, 300]]), torch.tensor([2, 0])),
                           (torch.tensor([[11, 12, 13], [50, 60, 70]]), torch.tensor([0, 1]))):
            hidden, keep = step_fn(inner, cache, attention, cand, next_pos, False)
            got = reward_model.head(hidden).squeeze(-1)
            for r in range(2):
                full = [ids[r] + prefixes[r] + [t] for t in cand[r].tolist()]
                want = reward_model(**batch_inputs(model.config, full, [images[r]] * 3, pad))
                assert got[r] == pytest.approx(want, abs=1e-4), (r, got[r], want)
                prefixes[r].append(int(cand[r, pick[r]]))
            assert len(set(got.flatten().tolist())) == 6   # the candidates do differ: the check can tell them apart
            cache = keep(pick)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
            next_pos = next_pos + 1


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm"])
def test_every_family_decodes_the_naive_tokens(family, tmp_path_factory):
    """Tiles (LLaVA-NeXT, Idefics3), M-RoPE (Qwen), token types and sliding-window layers (Gemma3): images of
    three sizes, so prompts differ in length and image layout, and both sharing modes against the naive."""
    from transformers import AutoModelForImageTextToText

    from csr_plugin.config import ModelConfig
    from csr_plugin.sampling.transformers_engine import load_vlm
    from csr_plugin.toy.tiny_families import build_tiny_family

    path = build_tiny_family(family, tmp_path_factory.mktemp(family) / family)
    model, processor = load_vlm(ModelConfig(path=str(path), dtype="float32", device="cpu"))
    torch.manual_seed(1)
    rm = MultimodalRewardModel(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), "mlp2").eval()
    with torch.no_grad():
        rm.head[2].weight.mul_(30.0)   # as the `reward_model` fixture: rewards that reorder the top k
    encoded = [encode_prompt(processor, chat_prompt(processor, q), Image.new("RGB", size, c))
               for q, size, c in zip(QUESTIONS, [(48, 48), (96, 48), (64, 40)], COLOURS)]
    ids, images = [e[0] for e in encoded], [e[1] for e in encoded]
    setup = setup_for(processor, model)
    settings = PargsSettings(top_k=4, weight=2.0, greedy=False, max_new_tokens=6)
    naive = guided_decode_naive(model, rm, ids, images, [1, 2, 3], settings, setup)
    for sharing in ("mask", "expand"):
        assert guided_decode(model, rm, ids, images, [1, 2, 3], settings, setup, sharing=sharing) == naive, sharing
    unguided = guided_decode(model, rm, ids, images, [1, 2, 3], PargsSettings(4, 0.0, False, 6), setup)
    assert unguided != naive   # the rewards steer: a decoder ignoring them would fail the comparison above


def test_a_request_reaching_the_sliding_window_is_refused(policy):
    from csr_plugin.sampling.pargs_decoding import check_window

    model, _ = policy
    gemma_like = types.SimpleNamespace(config=types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(
        layer_types=["sliding_attention", "full_attention"], sliding_window=64)))
    check_window(gemma_like, [[1] * 40], PargsSettings(top_k=10, max_new_tokens=13))   # 63 < 64: fine
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens \+ top_k \(64\) below the model's sliding window"):
        check_window(gemma_like, [[1] * 40], PargsSettings(top_k=10, max_new_tokens=14))
    check_window(model, [[1] * 5000], PargsSettings())   # no sliding window: no limit


def test_a_stored_evaluation_is_reused_only_for_the_same_decoding_and_evaluation_set(tmp_path, monkeypatch):
    import json

    from csr_plugin.config import EvalConfig, ModelConfig
    from csr_plugin.eval import evaluate as evaluation

    calls = []
    monkeypatch.setattr(evaluation, "evaluate", lambda model_cfg, cfg, **_: calls.append(cfg.decoding) or
                        {"chair_i": 0.1, "decoding": evaluation.decoding_spec(cfg),
                         "eval_set": evaluation.eval_set_spec(cfg)})
    for name in ("p", "t", "v"):
        (tmp_path / name).write_text(f"{name}\n")
    files = {key: str(tmp_path / name) for key, name in (("prompts", "p"), ("truth", "t"), ("vocabulary", "v"))}
    greedy, pargs = EvalConfig(**files), EvalConfig(**files, decoding="pargs", rm=str(tmp_path / "rm"))
    path = tmp_path / "eval_iter0.json"
    # written before decoding was recorded: greedy, on this evaluation set
    path.write_text(json.dumps({"chair_i": 0.5, "eval_set": evaluation.eval_set_spec(greedy)}))
    assert evaluation.evaluate_cached(ModelConfig(path="m"), greedy, path)["chair_i"] == 0.5 and calls == []
    assert evaluation.evaluate_cached(ModelConfig(path="m"), pargs, path)["chair_i"] == 0.1 and calls == ["pargs"]
    assert evaluation.evaluate_cached(ModelConfig(path="m"), pargs, path)["chair_i"] == 0.1 and calls == ["pargs"]
    # the same prompts file, rewritten with more prompts: evaluated again, then reused
    (tmp_path / "p").write_text("p\np2\n")
    assert evaluation.evaluate_cached(ModelConfig(path="m"), pargs, path)["chair_i"] == 0.1 and calls == ["pargs"] * 2
    assert evaluation.evaluate_cached(ModelConfig(path="m"), pargs, path)["chair_i"] == 0.1 and calls == ["pargs"] * 2
    # a result stored before the evaluation set was recorded is not trusted
    path.write_text(json.dumps({"chair_i": 0.5}))
    assert evaluation.evaluate_cached(ModelConfig(path="m"), greedy, path)["chair_i"] == 0.1
    assert calls == ["pargs", "pargs", "greedy"]
