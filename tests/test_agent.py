"""The OpenRLHF agent executor inside OpenRLHF's real RolloutRayActor over a real AsyncLLMEngine.

The actor is OpenRLHF's class (without Ray: its ``__init__`` awaited on an event
loop of our own thread), built with the arguments `csr sample --ray --openrlhf`
gives it; it loads our agent by ``agent_func_path`` and builds vLLM's
``AsyncLLMEngine`` (vLLM 0.29, CPU build) as it does in PPO. OpenRLHF's
``generate``, ``generate_responses``, vlm_utils and
``_process_response_into_experience`` are the real ones.
"""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from csr_plugin.config import recipe_from_dict

CANDIDATES = 5   # the case: vLLM streamed n = 5 as 1 or 2 candidates per expansion


@pytest.fixture(scope="module")
def rollout_actor(tiny_recipe_dict, tmp_path_factory):
    """(actor, recipe, run): OpenRLHF's RolloutRayActor on a loop of its own; ``run(coro)`` awaits on it."""
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor
    from transformers import AutoProcessor

    from csr_plugin.sampling.openrlhf_actors import rollout_actor_kwargs
    from csr_plugin.sampling.vllm_engine import cpu_env

    tmp = tmp_path_factory.mktemp("agent")
    data = json.loads(json.dumps(tiny_recipe_dict))
    data["output_dir"] = str(tmp / "out")
    data["search"].update(max_sentences=3, max_new_tokens=10, seed=7, candidates=CANDIDATES)
    data["curation"] = {"length_normalize": False}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(data))
    recipe = recipe_from_dict(data)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=300)

    with pytest.MonkeyPatch.context() as env:
        # as the actor's Ray runtime_env sets them; RAY_ADDRESS only keeps the actor from asking Ray for one
        env.setenv("CSR_RECIPE", str(tmp / "recipe.yaml"))
        env.setenv("CSR_RECIPE_OVERRIDES", "")
        env.setenv("RAY_ADDRESS", "unused-outside-ray")
        for name, value in cpu_env().items():
            env.setenv(name, value)
        processor = AutoProcessor.from_pretrained(recipe.model.path)
        cls = RolloutRayActor.__ray_actor_class__
        actor = cls.__new__(cls)
        run(cls.__init__(actor, **rollout_actor_kwargs(recipe, use_gpu=False, processor=processor)))
        yield actor, recipe, run

        async def close():   # on the actor's loop, so that vLLM's output tasks end there
            actor.llm.shutdown()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        run(close())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


class CountingEngine:
    """The executor's ``llm_engine``: the real actor's generate, recording each request's candidates."""

    def __init__(self, actor):
        self.actor = actor
        self.candidates: list[tuple[int, int]] = []   # (asked n, got)
        self.in_flight = self.most_in_flight = 0

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            output = await self.actor.generate(prompt_token_ids, sampling_params, multi_modal_data)
        finally:
            self.in_flight -= 1
        self.candidates.append((sampling_params.n, len(output.outputs)))
        return output


def _prompt(tiny_root):
    record = json.loads((tiny_root / "prompts" / "prompts.jsonl").read_text().splitlines()[0])
    image = str((tiny_root / "prompts" / record["image"]).resolve())
    return record, image


def _params(logprobs=1):
    import vllm

    # OpenRLHF's _dispatch_prompts_to_vllm: max_tokens None = dynamic, min_tokens 1, logprobs 1 with IS correction
    return vllm.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=None, min_tokens=1,
                               skip_special_tokens=False, logprobs=logprobs)


def _templated(processor, question):
    from openrlhf.datasets.prompts_dataset import preprocess_data

    prompt, _ = preprocess_data({"input": f"<image>{question}"}, input_key="input",
                                apply_chat_template=processor.apply_chat_template)
    return prompt


def _assert_logprobs_match_a_forward(response, prompt_len, model, processor, image, text):
    tokens, logprobs = response["observation_tokens"], response["rollout_log_probs"]
    assert len(logprobs) == len(tokens) and logprobs[:prompt_len] == [0.0] * prompt_len
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[text],
                       add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), pixel_values=inputs["pixel_values"]).logits[0].float()
    expected = logits[prompt_len - 1:-1].log_softmax(-1).gather(
        -1, torch.tensor(tokens[prompt_len:])[:, None]).squeeze(-1)
    assert logprobs[prompt_len:] == pytest.approx(expected.tolist(), abs=1e-4)


def test_agent_rollout_is_a_valid_openrlhf_trajectory_with_every_candidate(rollout_actor, tiny_root,
                                                                           tiny_model_and_processor):
    actor, recipe, run = rollout_actor
    model, processor = tiny_model_and_processor
    engine = CountingEngine(actor)
    record, image = _prompt(tiny_root)
    text = _templated(processor, record["question"])
    label = json.dumps({"id": record["id"], "image": image, "deterministic": True})
    response = run(actor.executor.execute(prompt=text, label=label, sampling_params=_params(), max_length=1024,
                                          hf_tokenizer=processor, llm_engine=engine, images=[image]))

    # every expansion got all search.candidates candidates (vLLM's streamed default lost most of them)
    assert len(engine.candidates) > 1
    assert engine.candidates == [(CANDIDATES, CANDIDATES)] * len(engine.candidates)

    from openrlhf.utils.vlm_utils import process_prompt_with_images

    prompt_ids, _, _ = process_prompt_with_images(processor, text, [image])
    tokens = response["observation_tokens"]
    assert tokens[:len(prompt_ids)] == prompt_ids
    assert response["action_ranges"] == [(len(prompt_ids), len(tokens))] and len(tokens) > len(prompt_ids)

    tree = response["csr_tree"]
    assert tree["id"] == record["id"] and tree["image"] == image
    # the trajectory is a root-to-final path of the tree: its sentences in order, then EOS if it stopped
    path, end = [], len(prompt_ids)
    for sentence_end, reward in response["csr_sentence_rewards"]:
        node = next(n for n in tree["nodes"] if n["parent"] == (path[-1]["id"] if path else 0)
                    and n["token_ids"] == tokens[end:sentence_end])
        assert reward == pytest.approx(node["reward"])
        path.append(node)
        end = sentence_end
    assert path and path[-1]["final"]
    tail = tokens[end:]
    assert tail in ([], [processor.tokenizer.eos_token_id])
    assert (tail != []) == (path[-1]["finish"] == "eos" and path[-1]["token_ids"][-1:] != tail)
    # the response's reward is the sum of its sentence rewards (curation.length_normalize: false)
    assert response["reward"] == pytest.approx(sum(n["reward"] for n in path))
    assert response["extra_logs"]["sentences"] == len(path)

    # rollout log-probs line up with the tokens: vLLM's equal one plain HF forward (fp32) within 1e-4
    _assert_logprobs_match_a_forward(response, len(prompt_ids), model, processor, image, text)

    # a step's expansions are in flight together (beam width 3 after the first step), so vLLM batches them
    assert engine.most_in_flight >= 2

    # OpenRLHF's own conversion into an Experience accepts it
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    experience = SamplesGenerator._process_response_into_experience(object.__new__(SamplesGenerator), response,
                                                                    max_len=1024)
    assert int(experience.action_mask.sum()) == len(tokens) - len(prompt_ids)
    assert experience.rewards.tolist() == pytest.approx([response["reward"]])
    assert experience.info["r_i"].tolist() == pytest.approx([response["extra_logs"]["r_i"]])


def test_concurrent_calls_draw_distinct_trajectories_and_share_clip(rollout_actor, tiny_root,
                                                                     tiny_model_and_processor):
    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

    actor, _, run = rollout_actor
    processor = tiny_model_and_processor[1]
    agent_file = str(Path(__file__).parents[1] / "csr_plugin/openrlhf/agent.py")
    assert _load_agent_executor(agent_file).clip is actor.executor.clip   # CLIP loads once per worker process
    record, image = _prompt(tiny_root)
    # OpenRLHF's generate_responses: n_samples_per_prompt calls of the actor's executor, concurrently
    responses = run(actor.generate_responses(prompt=_templated(processor, record["question"]), label=image,
                                             sampling_params=_params(logprobs=None), max_length=1024,
                                             hf_tokenizer=processor, num_samples=3, images=[image]))
    actions = [tuple(r["observation_tokens"][r["action_ranges"][0][0]:]) for r in responses]
    assert len(set(actions)) == 3, "each call must draw its own trajectory"
    assert all(r["rollout_log_probs"] is None for r in responses)
    assert all(r["csr_tree"]["image"] == image for r in responses)  # label as a plain path works too


def test_agent_refuses_a_prompt_without_an_image(rollout_actor, tiny_model_and_processor):
    actor, _, run = rollout_actor
    with pytest.raises(ValueError, match="carries no image"):
        run(actor.executor.execute(prompt="Describe.", label="", sampling_params=None, max_length=256,
                                   hf_tokenizer=tiny_model_and_processor[1], llm_engine=actor, images=None))


def test_one_candidate_is_one_plain_request_split_into_sentences_afterwards(rollout_actor, tiny_root,
                                                                            tiny_model_and_processor):
    import dataclasses

    from openrlhf.utils.vlm_utils import process_prompt_with_images

    from csr_plugin.openrlhf.agent import AgentExecutor
    from csr_plugin.openrlhf.plain_rollout import sentence_token_ends

    actor, recipe, run = rollout_actor
    model, processor = tiny_model_and_processor
    # the tiny model writes gibberish with few '.'; letters as delimiters give it several sentence ends
    plain = dataclasses.replace(recipe, search=dataclasses.replace(
        recipe.search, candidates=1, beam_width=1, keep_top=1, keep_bottom=0, delimiters=[".", "!", "?", *"aeiouns"]))
    executor = AgentExecutor(plain)
    engine = CountingEngine(actor)
    record, image = _prompt(tiny_root)
    text = _templated(processor, record["question"])
    label = json.dumps({"id": record["id"], "image": image, "deterministic": True})
    response = run(executor.execute(prompt=text, label=label, sampling_params=_params(), max_length=1024,
                                    hf_tokenizer=processor, llm_engine=engine, images=[image]))

    assert engine.candidates == [(1, 1)]  # the whole response in one request
    prompt_ids, _, _ = process_prompt_with_images(processor, text, [image])
    tokens = response["observation_tokens"]
    generated = tokens[len(prompt_ids):]
    budget = plain.search.max_new_tokens * plain.search.max_sentences
    assert tokens[:len(prompt_ids)] == prompt_ids and 0 < len(generated) <= budget
    assert response["truncated"] == (len(generated) == budget and generated[-1] != processor.tokenizer.eos_token_id)

    # one node per sentence; together they are exactly the generated tokens, nothing dropped
    nodes = response["csr_tree"]["nodes"][1:]
    assert len(nodes) >= 2 and [n["parent"] for n in nodes] == list(range(len(nodes)))
    assert [t for n in nodes for t in n["token_ids"]] == generated
    ends = sentence_token_ends(processor.tokenizer, generated, plain.search.delimiters,
                               {processor.tokenizer.eos_token_id})
    assert [end for end, _ in response["csr_sentence_rewards"]] == [len(prompt_ids) + e for e in ends]
    assert [r for _, r in response["csr_sentence_rewards"]] == pytest.approx([n["reward"] for n in nodes])
    for node in nodes:  # R_T from the sentence's own log-probs, as the search scores a candidate
        assert node["r_t"] == pytest.approx(sum(node["logprobs"]) / len(node["logprobs"]))
        lam = plain.reward.lambda_
        assert node["reward"] == pytest.approx(lam * node["r_i"] + (1 - lam) * node["r_t"])
    # with ppo.dense_rewards the response's reward is the sum the trainer's patch centres
    assert response["reward"] == pytest.approx(sum(n["reward"] for n in nodes))
    _assert_logprobs_match_a_forward(response, len(prompt_ids), model, processor, image, text)
