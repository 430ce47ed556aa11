"""The visual term's source (reward.source): CLIP exactly as before, or a reward model's gain
R_I(s_k) = mrm_scale * (r(x, y_<k + s_k) - r(x, y_<k)) in the search, the response scorer and serve-reward.

The reward model is the tiny random LLaVA with a linear head drawn under a fixed seed (as
tests/test_reward_model.py builds one), saved as `csr train-rm` saves final/. "By hand" below is one
unpadded forward per sequence, independent of the scorer's batching, padding and caching."""
from __future__ import annotations

import copy
import json
import queue
import threading
from pathlib import Path

import pytest
import torch
import yaml

from csr_plugin.config import ConfigError, recipe_from_dict

from test_agent import rollout_actor  # noqa: E402,F401 - OpenRLHF's rollout actor, shared fixture

SCALE = 3.0   # not 1, so a missing scale would show


@pytest.fixture(scope="module")
def rm_folder(tiny_recipe_dict, tmp_path_factory) -> Path:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from csr_plugin.reward_model.model import MultimodalRewardModel, split_state, write_reward_model

    path = tiny_recipe_dict["model"]["path"]
    backbone = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    model = MultimodalRewardModel(backbone, "linear")
    backbone_state, head_state = split_state(model.state_dict())
    folder = tmp_path_factory.mktemp("rm") / "final"
    write_reward_model(folder, backbone, AutoProcessor.from_pretrained(path), backbone_state, head_state, "linear",
                       {"partial": True})
    return folder


def _recipe_dict(tiny_recipe_dict, rm_folder=None, **reward):
    data = copy.deepcopy(tiny_recipe_dict)
    data["reward"] = dict(reward)
    if rm_folder is not None:
        data["reward"].update(source="mrm", mrm=str(rm_folder), mrm_scale=SCALE)
    return data


@pytest.fixture(scope="module")
def mrm(rm_folder, tiny_recipe_dict):
    from csr_plugin.reward.source import build_visual_scorer

    return build_visual_scorer(recipe_from_dict(_recipe_dict(tiny_recipe_dict, rm_folder)))


def _by_hand(mrm, prompt_ids, image_inputs, response_ids) -> float:
    """r(x, y): one unpadded forward of prompt + response, no cache."""
    from csr_plugin.multimodal import batch_inputs

    with torch.inference_mode():
        return mrm.model(**batch_inputs(mrm.model.backbone.config, [list(prompt_ids) + list(response_ids)],
                                        [image_inputs], mrm.pad_id)).item()


@pytest.fixture(scope="module")
def jobs(tiny_recipe_dict, tiny_model_and_processor):
    from conftest import make_engine

    from csr_plugin.sampling.local import prepare_job
    from csr_plugin.sampling.prompts import load_prompts

    engine = make_engine(tiny_model_and_processor, max_new_tokens=8)
    prompts, _ = load_prompts(tiny_recipe_dict["data"]["prompts"], limit=2)
    return engine, [prepare_job(p, engine) for p in prompts]


# --------------------------------------------------------------------------------------------- clip
def test_clip_source_gives_exactly_todays_rewards(tiny_recipe_dict, tiny_clip, jobs, tiny_model_and_processor):
    """source: clip (the default) is ClipRelevance.score of the sentence alone, and a search with the built
    scorer writes the same trees, float for float, as a search handed the ClipRelevance itself."""
    from csr_plugin.config import CurationConfig, SearchConfig
    from csr_plugin.openrlhf.response_reward import ResponseItem, ResponseRewardScorer
    from csr_plugin.reward.source import ClipVisual, SentenceInContext, build_visual_scorer
    from csr_plugin.sampling.local import build_clip
    from csr_plugin.sampling.search import SentenceBeamSearch

    recipe = recipe_from_dict(_recipe_dict(tiny_recipe_dict))
    assert recipe.reward.source == "clip"
    built = build_visual_scorer(recipe)
    assert isinstance(built, ClipVisual) and isinstance(build_clip(recipe), ClipVisual)
    engine, prompt_jobs = jobs
    image = prompt_jobs[0].image_data
    texts = ["A red circle.", "A blue square is here.", "Two shapes"]
    # the image's own path as its cache key: the session's tiny_clip caches embeddings by key, and other
    # tests cache other images under short keys such as "img"
    key = prompt_jobs[0].image
    items = [SentenceInContext(key, image, t, "q", (5, 6), (7,)) for t in texts]
    assert built.visual(items) == tiny_clip.score([(key, image, t) for t in texts])

    search = dict(tiny_recipe_dict["search"], max_sentences=2, max_new_tokens=8)
    trees = [[t.to_json() for t in SentenceBeamSearch(engine, clip, SearchConfig(**search), recipe.reward,
                                                      CurationConfig()).run(prompt_jobs)]
             for clip in (tiny_clip, built)]
    assert trees[0] == trees[1] and len(trees[0][0]["nodes"]) > 3

    model, processor = tiny_model_and_processor
    responses = [ResponseItem("USER: <image>\nDescribe. ASSISTANT:", " A red circle. A blue square.",
                              prompt_jobs[0].image)]
    today = ResponseRewardScorer(model, processor, tiny_clip, recipe).score(responses)
    assert ResponseRewardScorer(model, processor, built, recipe).score(responses) == today


# --------------------------------------------------------------------------------------------- mrm gain
def test_mrm_gain_is_the_reward_difference_computed_by_hand(mrm, jobs):
    """visual = SCALE * (r(prefix + sentence) - r(prefix)), r(empty prefix) = the prompt alone; all rows of a
    call in one forward; prefixes already scored (as an earlier candidate) are not scored again."""
    from csr_plugin.multimodal import chat_prompt, encode_prompt
    from csr_plugin.reward.source import SentenceInContext

    _, prompt_jobs = jobs
    job = prompt_jobs[0]
    prompt_ids, image_inputs = encode_prompt(mrm.processor, chat_prompt(mrm.processor, job.question), job.image_data)
    assert prompt_ids == job.encoded.token_ids   # the reward model reads the prompt as the policy did
    tok = mrm.processor.tokenizer
    first, second = tok(" A red circle.", add_special_tokens=False)["input_ids"], \
        tok(" A blue square.", add_special_tokens=False)["input_ids"]
    items = [SentenceInContext(job.image, job.image_data, "A red circle.", job.question, (), tuple(first)),
             SentenceInContext(job.image, job.image_data, "A blue square.", job.question, tuple(first),
                               tuple(second))]
    mrm._scores.clear()
    before = mrm.forwards
    gains = mrm.visual(items)
    assert mrm.forwards == before + 1   # 3 distinct sequences (empty, first, first + second), one forward
    r_empty, r_first, r_both = (_by_hand(mrm, prompt_ids, image_inputs, ids) for ids in ([], first, first + second))
    assert gains == pytest.approx([SCALE * (r_first - r_empty), SCALE * (r_both - r_first)], abs=1e-4)
    assert min(abs(g) for g in gains) > 1e-3, "a zero gain would not test the difference"
    # the random head gives negative gains too: CLIP's R_I never is (clamped at 0), so the source is visible
    assert mrm.visual(items) == gains and mrm.forwards == before + 1   # all cached: no forward


def test_search_with_mrm_writes_the_gains_as_r_i(mrm, jobs, tiny_recipe_dict):
    """Every node of the trees: r_i = SCALE * (r(prompt + path ids) - r(prompt + parent's path ids)) by hand,
    reward = lambda * r_i + (1 - lambda) * r_t; one reward-model forward per search step."""
    from csr_plugin.config import CurationConfig, RewardConfig, SearchConfig
    from csr_plugin.multimodal import chat_prompt, encode_prompt
    from csr_plugin.sampling.search import SentenceBeamSearch

    engine, prompt_jobs = jobs
    search = dict(tiny_recipe_dict["search"], max_sentences=2, max_new_tokens=8)
    reward = RewardConfig(lambda_=0.7, source="mrm", mrm="unused", mrm_scale=SCALE)
    calls, original = [], mrm.visual
    mrm._scores.clear()
    before = mrm.forwards
    try:
        mrm.visual = lambda items: calls.append(len(items)) or original(items)
        trees = SentenceBeamSearch(engine, mrm, SearchConfig(**search), reward, CurationConfig()).run(prompt_jobs)
    finally:
        del mrm.visual
    assert len(calls) == 2 and mrm.forwards - before == len(calls)   # 2 steps, one forward each
    checked = 0
    for job, tree in zip(prompt_jobs, trees):
        prompt_ids, image_inputs = encode_prompt(mrm.processor, chat_prompt(mrm.processor, job.question),
                                                 job.image_data)
        nodes = {n.id: n for n in tree.nodes}

        def path_ids(node):
            ids = []
            while node.parent is not None:
                ids = node.token_ids + ids
                node = nodes[node.parent]
            return ids

        for node in tree.nodes[1:]:
            expected = SCALE * (_by_hand(mrm, prompt_ids, image_inputs, path_ids(node))
                                - _by_hand(mrm, prompt_ids, image_inputs, path_ids(nodes[node.parent])))
            assert node.r_i == pytest.approx(expected, abs=1e-3)
            assert node.reward == pytest.approx(0.7 * node.r_i + 0.3 * node.r_t)
            checked += 1
    assert checked >= 6 and any(n.r_i < 0 for t in trees for n in t.nodes[1:])


def test_csr_sample_with_mrm(tmp_path, tiny_recipe_dict, rm_folder, capsys):
    """`csr sample` builds the reward-model source from the recipe: its trees carry negative r_i, which CLIP
    (clamped at 0) never writes; a missing reward.mrm folder exits 2 naming the key before any model loads."""
    from csr_plugin.cli import main

    data = _recipe_dict(tiny_recipe_dict, rm_folder)
    data["output_dir"] = str(tmp_path / "out")
    data["data"]["limit"] = 2
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert main(["sample", "--config", str(tmp_path / "r.yaml"), "--quiet", "search.max_sentences=2"]) == 0
    trees = [json.loads(line) for line in (tmp_path / "out" / "trees.jsonl").read_text().splitlines()]
    assert len(trees) == 2 and any(n["r_i"] < 0 for t in trees for n in t["nodes"][1:])
    capsys.readouterr()
    assert main(["sample", "--config", str(tmp_path / "r.yaml"), "--quiet", f"reward.mrm={tmp_path / 'none'}",
                 f"output_dir={tmp_path / 'out2'}"]) == 2
    assert "reward.mrm" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- scorer / server
def _post(port, body):
    """(status, JSON answer) of one request on a fresh loopback connection."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/get_reward", json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _tokens(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"


def test_response_scorer_gains_telescope_to_the_whole_response(mrm, tiny_model_and_processor, tiny_recipe_dict,
                                                                 rm_folder, tiny_root):
    """Per sentence r_i = SCALE * (r(prefix + sentence) - r(prefix)) on the response's own ids; the first is
    checked by hand and the sum is r(whole response) - r(prompt alone). Ids ending in EOS keep it on the last
    sentence, as the search's last sentence carries its EOS."""
    from csr_plugin.multimodal import _IMAGE_KEYS
    from csr_plugin.openrlhf.response_reward import ResponseItem, ResponseRewardScorer

    model, processor = tiny_model_and_processor
    recipe = recipe_from_dict(_recipe_dict(tiny_recipe_dict, rm_folder))
    scorer = ResponseRewardScorer(model, processor, mrm, recipe)
    image = str(sorted((tiny_root / "prompts" / "images").glob("*.png"))[0])
    text = " A red circle. A blue square."
    ids = _tokens(processor, text)
    eos = processor.tokenizer.eos_token_id
    by_text, by_ids = scorer.score([ResponseItem(PROMPT, text, image),
                                    ResponseItem(PROMPT, "", image, response_ids=tuple(ids + [eos]))])
    inputs = processor(images=scorer.image(image), text=PROMPT, add_special_tokens=False, return_tensors="pt")
    prompt_ids = inputs.pop("input_ids")[0].tolist()
    image_inputs = {k: v for k, v in inputs.items() if k in _IMAGE_KEYS}
    k = next(k for k in range(len(ids) + 1) if processor.tokenizer.decode(ids[:k]) == " A red circle.")
    r_empty, r_first, r_all, r_eos = (_by_hand(mrm, prompt_ids, image_inputs, x)
                                      for x in ([], ids[:k], ids, ids + [eos]))
    assert [s["text"] for s in by_text.sentences] == ["A red circle.", "A blue square."]
    assert [s["r_i"] for s in by_text.sentences] == pytest.approx([SCALE * (r_first - r_empty),
                                                                   SCALE * (r_all - r_first)], abs=1e-3)
    assert [s["r_i"] for s in by_ids.sentences] == pytest.approx([SCALE * (r_first - r_empty),
                                                                  SCALE * (r_eos - r_first)], abs=1e-3)
    assert abs(r_eos - r_all) > 1e-3, "the EOS must change the reward for this check to mean anything"
    for s in by_text.sentences:
        assert s["reward"] == pytest.approx(0.9 * s["r_i"] + 0.1 * s["r_t"])


def test_serve_reward_with_mrm_answers_concurrent_requests(tiny_recipe_dict, rm_folder, tiny_root):
    """serve() as `csr serve-reward` runs it, reward.source: mrm: 6 requests from 6 threads at once, each
    answered with the reward the scorer gives the same item directly (batched differently: 1e-4)."""
    from csr_plugin.openrlhf.response_reward import openrlhf_items
    from csr_plugin.openrlhf.reward_server import serve

    images = sorted(str(p) for p in (tiny_root / "prompts" / "images").glob("*.png"))
    recipe = recipe_from_dict(_recipe_dict(tiny_recipe_dict, rm_folder))
    ready: queue.Queue = queue.Queue()
    thread = threading.Thread(target=serve, args=(recipe,), kwargs={"ready": ready.put}, daemon=True)
    thread.start()
    server = ready.get(timeout=300)
    try:
        responses = [" A red circle.", " A blue square. It is big.", " Two shapes", " The green triangle is small.",
                     " It is big. It is red.", " Nothing."]
        bodies = [{"query": [PROMPT + r], "prompts": [PROMPT], "labels": [json.dumps({"image": images[i % 3]})]}
                  for i, r in enumerate(responses)]
        answers: list = [None] * len(bodies)

        def client(i):
            answers[i] = _post(server.port, bodies[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        scorer = server._batcher.scorer
        assert type(scorer.visual).__name__ == "RewardModelVisual"
        for body, (status, data) in zip(bodies, answers):
            assert status == 200, data
            items = openrlhf_items(body["query"], body["prompts"], body["labels"], scorer.image_token)
            direct = scorer.score(items)[0]
            assert data["rewards"] == pytest.approx([direct.reward], abs=1e-4)
            assert any(s["r_i"] != 0 for s in direct.sentences)
    finally:
        server.stop()
        thread.join(30)
    assert not thread.is_alive()


# --------------------------------------------------------------------------------------------- errors
def test_missing_or_invalid_mrm_path_errors_name_the_key(tiny_recipe_dict, tmp_path):
    from csr_plugin.reward.source import build_visual_scorer
    from csr_plugin.sampling.ray_actors import actor_recipe

    with pytest.raises(ConfigError, match=r"`reward.mrm` is required with `reward.source: mrm`"):
        recipe_from_dict({**tiny_recipe_dict, "reward": {"source": "mrm"}})
    with pytest.raises(ConfigError, match=r"`reward.mrm_scale` must be > 0"):
        recipe_from_dict({**tiny_recipe_dict, "reward": {"mrm_scale": 0}})
    with pytest.raises(ConfigError, match=r"`reward.source` must be one of clip, mrm"):
        recipe_from_dict({**tiny_recipe_dict, "reward": {"source": "rm"}})
    (tmp_path / "not_a_rm").mkdir()   # a folder, but not one `csr train-rm` wrote
    for path in (tmp_path / "missing", tmp_path / "not_a_rm"):
        recipe = recipe_from_dict({**tiny_recipe_dict, "reward": {"source": "mrm", "mrm": str(path)}})
        with pytest.raises(FileNotFoundError, match=r"reward.mrm .* holds no reward_model.json: give the final/"):
            build_visual_scorer(recipe)
    # Ray actors run in Ray's own folder: a relative reward.mrm reaches them absolute
    relative = recipe_from_dict({**tiny_recipe_dict, "reward": {"source": "mrm", "mrm": "."}})
    assert actor_recipe(relative)["reward"]["mrm"] == str(Path(".").resolve())


def test_a_reward_model_at_chance_is_named_when_it_loads(rm_folder, tiny_recipe_dict, tmp_path, capsys):
    """Held-out accuracy within 2 binomial standard errors of 0.5 is warned about: with 104 pairs the bar is
    0.5 + 2 * sqrt(0.25 / 104) = 0.598, so 0.481 (a trained toy RM that learnt nothing) is named and 0.644 is not;
    a model without held-out pairs cannot be judged and says nothing."""
    import shutil

    from csr_plugin.reward.source import build_visual_scorer, chance_level_warning

    at_chance = {"held_out": {"eval_pairs": 104, "eval_acc": 0.481}}
    assert "48.1% of its 104 held-out pairs" in chance_level_warning(at_chance, "rm/final")
    assert "59.8%" in chance_level_warning(at_chance, "rm/final")
    assert chance_level_warning({"held_out": {"eval_pairs": 104, "eval_acc": 0.644}}, "rm/final") is None
    # 10 held-out pairs: the bar is 0.5 + 2 * sqrt(0.025) = 0.816, so even 8 of 10 right is named
    assert chance_level_warning({"held_out": {"eval_pairs": 10, "eval_acc": 0.8}}, "rm/final") is not None
    assert chance_level_warning({}, "rm/final") is None

    folder = tmp_path / "final"
    shutil.copytree(rm_folder, folder)
    info = json.loads((folder / "reward_model.json").read_text())
    (folder / "reward_model.json").write_text(json.dumps({**info, **at_chance}))
    build_visual_scorer(recipe_from_dict(_recipe_dict(tiny_recipe_dict, folder)))
    assert "not above chance" in capsys.readouterr().out
    build_visual_scorer(recipe_from_dict(_recipe_dict(tiny_recipe_dict, rm_folder)))   # no held-out pairs
    assert "not above chance" not in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- agent
def test_agent_with_mrm_writes_the_gains_as_r_i(rollout_actor, tiny_root, tiny_model_and_processor, rm_folder, mrm):
    """The OpenRLHF agent (our executor, OpenRLHF's real rollout actor as its engine) with reward.source: mrm:
    every node's r_i is the gain by hand, the prompt read from OpenRLHF's templated text as its rollout reads it."""
    from PIL import Image

    from csr_plugin.config import recipe_to_dict
    from csr_plugin.openrlhf.agent import AgentExecutor
    from test_agent import CountingEngine, _params, _prompt, _templated

    actor, recipe, run = rollout_actor
    data = recipe_to_dict(recipe)
    data["reward"].update(source="mrm", mrm=str(rm_folder), mrm_scale=SCALE)
    executor = AgentExecutor(recipe_from_dict(data))
    assert executor.clip.needs_ids   # the shared, serialised reward-model source
    _, processor = tiny_model_and_processor
    record, image = _prompt(tiny_root)
    text = _templated(processor, record["question"])
    label = json.dumps({"id": record["id"], "image": image, "deterministic": True})
    response = run(executor.execute(prompt=text, label=label, sampling_params=_params(), max_length=1024,
                                    hf_tokenizer=processor, llm_engine=CountingEngine(actor), images=[image]))
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[text], add_special_tokens=False,
                       return_tensors="pt")
    prompt_ids, image_inputs = inputs["input_ids"][0].tolist(), {"pixel_values": inputs["pixel_values"]}
    nodes = {n["id"]: n for n in response["csr_tree"]["nodes"]}

    def path_ids(node):
        ids = []
        while node["parent"] is not None:
            ids = node["token_ids"] + ids
            node = nodes[node["parent"]]
        return ids

    assert len(nodes) > 3
    for node in list(nodes.values())[1:]:
        expected = SCALE * (_by_hand(mrm, prompt_ids, image_inputs, path_ids(node))
                            - _by_hand(mrm, prompt_ids, image_inputs, path_ids(nodes[node["parent"]])))
        assert node["r_i"] == pytest.approx(expected, abs=1e-3)


def test_csr_sample_on_ray_actors_with_mrm(tmp_path, tiny_recipe_dict, rm_folder, monkeypatch):
    """`csr sample --ray` (our actors, a local cluster for the run) with reward.source: mrm: the same trees as
    the serial run, r_i to float rounding. (A local cluster's workers share the driver's working directory, so
    a relative reward.mrm would pass here either way: actor_recipe's resolution is checked on its own below.)"""
    pytest.importorskip("ray")
    from csr_plugin.jsonl import load_records
    from csr_plugin.sampling.local import sample
    from csr_plugin.sampling.ray_driver import sample_on_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)   # the rollout_actor fixture sets it while it lives
    data = _recipe_dict(tiny_recipe_dict, rm_folder)
    data["data"]["limit"] = 2
    data["search"].update(max_sentences=2, max_new_tokens=8, batch_prompts=1)
    trees = {}
    for name in ("serial", "ray"):
        data["output_dir"] = str(tmp_path / name)
        recipe = recipe_from_dict(data)
        if name == "ray":
            summary = sample_on_ray(recipe, num_actors=2, progress=False)
        else:
            summary = sample(recipe, progress=False)
        assert summary.done == 2
        trees[name] = {t["id"]: t for t in load_records(tmp_path / name / "trees.jsonl")}
    assert trees["ray"].keys() == trees["serial"].keys()
    for key, want in trees["serial"].items():
        got = trees["ray"][key]["nodes"]
        assert [(n["parent"], n["token_ids"]) for n in got] == [(n["parent"], n["token_ids"]) for n in want["nodes"]]
        assert [n["r_i"] for n in got] == pytest.approx([n["r_i"] for n in want["nodes"]], abs=1e-4)
    assert any(n["r_i"] < 0 for t in trees["ray"].values() for n in t["nodes"][1:])
