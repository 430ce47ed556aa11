"""The OpenRLHF agent executor, loaded the way OpenRLHF loads it, driven through a vLLM-shaped engine.

The engine is the test-only vLLM stand-in (tests/stand_in_vllm: transformers on
CPU) behind the same ``generate(prompt_token_ids, sampling_params,
multi_modal_data)`` that OpenRLHF's RolloutRayActor offers executors, including
its collapse of pre-expanded image tokens. OpenRLHF's own loader, vlm_utils and
``_process_response_into_experience`` are the real ones.
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from csr_plugin.config import recipe_from_dict

STAND_IN = str(Path(__file__).with_name("stand_in_vllm"))


@pytest.fixture
def openrlhf_side(monkeypatch, tiny_recipe_dict, tmp_path):
    """vllm stand-in importable, CSR_RECIPE set as a Ray runtime_env would; yields OpenRLHF's modules."""
    monkeypatch.syspath_prepend(STAND_IN)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    recipe = dict(tiny_recipe_dict, output_dir=str(tmp_path / "out"))
    recipe["search"] = dict(recipe["search"], max_sentences=3, max_new_tokens=10, seed=7)
    recipe["curation"] = {"length_normalize": False}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("CSR_RECIPE", str(path))
    monkeypatch.setenv("CSR_RECIPE_OVERRIDES", "")
    from openrlhf.trainer.ray import vllm_engine

    yield vllm_engine, recipe_from_dict(recipe)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        sys.modules.pop(name, None)


class RolloutActorLike:
    """OpenRLHF's RolloutRayActor.generate over the stand-in, counting how many requests overlap."""

    def __init__(self, model, processor):
        import vllm

        self.engine = vllm.AsyncStandInEngine(vllm.LLM.from_loaded(model, processor))
        self.pad_ids = {model.config.image_token_id}
        self.in_flight = self.most_in_flight = self.requests = 0

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        from openrlhf.utils.vlm_utils import dedup_media_tokens

        if multi_modal_data:  # as RolloutRayActor.generate: vLLM expands one placeholder itself
            prompt_token_ids = dedup_media_tokens(prompt_token_ids, self.pad_ids)
        self.requests += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.engine.generate(prompt_token_ids, sampling_params, multi_modal_data)
        finally:
            self.in_flight -= 1


def _prompt(tiny_root):
    record = json.loads((tiny_root / "prompts" / "prompts.jsonl").read_text().splitlines()[0])
    image = str((tiny_root / "prompts" / record["image"]).resolve())
    return record, image


def _execute(executor, processor, engine, text, label, image, logprobs=1, samples=1):
    import vllm

    # OpenRLHF's _dispatch_prompts_to_vllm: max_tokens None = dynamic, min_tokens 1, logprobs 1 with IS correction
    params = vllm.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=None, min_tokens=1,
                                 skip_special_tokens=False, logprobs=logprobs)

    async def run():
        return await asyncio.gather(*[executor.execute(prompt=text, label=label, sampling_params=params,
                                                       max_length=1024, hf_tokenizer=processor, llm_engine=engine,
                                                       images=[image]) for _ in range(samples)])

    return asyncio.run(run())


def _templated(processor, question):
    from openrlhf.datasets.prompts_dataset import preprocess_data

    prompt, _ = preprocess_data({"input": f"<image>{question}"}, input_key="input",
                                apply_chat_template=processor.apply_chat_template)
    return prompt


def test_agent_rollout_is_a_valid_openrlhf_trajectory(openrlhf_side, tiny_root, tiny_model_and_processor):
    vllm_engine, recipe = openrlhf_side
    model, processor = tiny_model_and_processor
    executor = vllm_engine._load_agent_executor(str(Path(__file__).parents[1] / "csr_plugin/openrlhf/agent.py"))
    engine = RolloutActorLike(model, processor)
    record, image = _prompt(tiny_root)
    text = _templated(processor, record["question"])
    # deterministic seeding: the same tree every run (with a fresh nonce per call the tree, and so
    # how many expansions a step has, would vary from run to run)
    label = json.dumps({"id": record["id"], "image": image, "deterministic": True})
    [response] = _execute(executor, processor, engine, text, label, image)

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

    # rollout log-probs line up with the tokens: equal to one independent forward of the model
    logprobs = response["rollout_log_probs"]
    assert len(logprobs) == len(tokens) and logprobs[:len(prompt_ids)] == [0.0] * len(prompt_ids)
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[text],
                       add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), pixel_values=inputs["pixel_values"]).logits[0].float()
    expected = logits[len(prompt_ids) - 1:-1].log_softmax(-1).gather(
        -1, torch.tensor(tokens[len(prompt_ids):])[:, None]).squeeze(-1)
    assert logprobs[len(prompt_ids):] == pytest.approx(expected.tolist(), abs=1e-4)

    # every step's expansions were in flight together (beam width 3 after the first step)
    assert engine.most_in_flight >= 2

    # OpenRLHF's own conversion into an Experience accepts it
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    experience = SamplesGenerator._process_response_into_experience(object.__new__(SamplesGenerator), response,
                                                                    max_len=1024)
    assert int(experience.action_mask.sum()) == len(tokens) - len(prompt_ids)
    assert experience.rewards.tolist() == pytest.approx([response["reward"]])
    assert experience.info["r_i"].tolist() == pytest.approx([response["extra_logs"]["r_i"]])


def test_concurrent_calls_draw_distinct_trajectories_and_share_clip(openrlhf_side, tiny_root,
                                                                     tiny_model_and_processor):
    vllm_engine, _ = openrlhf_side
    model, processor = tiny_model_and_processor
    agent_file = str(Path(__file__).parents[1] / "csr_plugin/openrlhf/agent.py")
    first, second = vllm_engine._load_agent_executor(agent_file), vllm_engine._load_agent_executor(agent_file)
    assert first.clip is second.clip  # CLIP loads once per worker process
    record, image = _prompt(tiny_root)
    text = _templated(processor, record["question"])
    # OpenRLHF's generate_responses: n_samples_per_prompt calls of one executor, concurrently
    responses = _execute(first, processor, RolloutActorLike(model, processor), text, image, image,
                         logprobs=None, samples=3)
    actions = [tuple(r["observation_tokens"][r["action_ranges"][0][0]:]) for r in responses]
    assert len(set(actions)) == 3, "each call must draw its own trajectory"
    assert all(r["rollout_log_probs"] is None for r in responses)
    assert all(r["csr_tree"]["image"] == image for r in responses)  # label as a plain path works too


def test_agent_refuses_a_prompt_without_an_image(openrlhf_side, tiny_model_and_processor):
    vllm_engine, _ = openrlhf_side
    model, processor = tiny_model_and_processor
    executor = vllm_engine._load_agent_executor(str(Path(__file__).parents[1] / "csr_plugin/openrlhf/agent.py"))
    with pytest.raises(ValueError, match="carries no image"):
        asyncio.run(executor.execute(prompt="Describe.", label="", sampling_params=None, max_length=256,
                                     hf_tokenizer=processor, llm_engine=RolloutActorLike(model, processor),
                                     images=None))
