"""`csr train-ppo` without CUDA: OpenRLHF's train_ppo_ray with real vLLM (the CPU build), gloo ranks and
gloo weight sync (csr_plugin/openrlhf/ppo_on_cpu.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from csr_plugin.openrlhf.ppo_on_cpu import WORKER_EXTENSION, GlooBroadcastGroup


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prompt_logprobs(llm, tokens: list[int]) -> torch.Tensor:
    import vllm
    from vllm.inputs import TokensPrompt

    [out] = llm.generate(TokensPrompt(prompt_token_ids=tokens), vllm.SamplingParams(max_tokens=1, prompt_logprobs=0),
                         use_tqdm=False)
    return torch.tensor([step[token].logprob for step, token in zip(out.prompt_logprobs[1:], tokens[1:])])


def _reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)


def test_weights_broadcast_over_gloo_reach_the_vllm_engine(tiny_recipe_dict, monkeypatch):
    """The trainer side (GlooBroadcastGroup, rank 0) sends perturbed language-model weights the way
    OpenRLHF's broadcast_to_vllm does, one parameter per update_weight call, the last one flagged; the
    engine's prompt log-probs then match the perturbed model's, and did not before."""
    import vllm
    from transformers import AutoModelForImageTextToText

    from csr_plugin.sampling.vllm_engine import CPU_ENGINE_DEFAULTS

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the worker in this process: rpc calls are plain calls
    path = tiny_recipe_dict["model"]["path"]
    llm = vllm.LLM(model=path, dtype="bfloat16", seed=0, max_model_len=512, worker_extension_cls=WORKER_EXTENSION,
                   **CPU_ENGINE_DEFAULTS)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        generator = torch.Generator().manual_seed(0)
        sent = [(name, p) for name, p in model.named_parameters() if "vision_tower" not in name]
        with torch.no_grad():
            for _, p in sent:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
                p.copy_(p.to(torch.bfloat16))   # what the engine can hold
        tokens = list(range(5, 45))
        expected = _reference_logprobs(model, tokens)
        before = _prompt_logprobs(llm, tokens)
        assert (before - expected).abs().max() > 0.5   # the perturbation is visible in the log-probs

        port = _free_port()
        trainer_error = []

        def trainer():   # rank 0: OpenRLHF's DeepSpeed rank 0
            try:
                group = GlooBroadcastGroup("127.0.0.1", port, 0, 2)
                for _, p in sent:
                    group.broadcast(p.data.to(torch.bfloat16).contiguous(), src=0)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                trainer_error.append(exc)

        thread = threading.Thread(target=trainer)
        thread.start()
        llm.collective_rpc("init_process_group", args=("127.0.0.1", port, 1, 2, "openrlhf", "gloo", False))
        for i, (name, p) in enumerate(sent):
            llm.collective_rpc("update_weight", args=(name, torch.bfloat16, p.shape, i == len(sent) - 1))
        thread.join(timeout=120)
        assert not trainer_error and not thread.is_alive()

        after = _prompt_logprobs(llm, tokens)
        # bf16 activations in vLLM against fp32 ones here, on the same bf16 weights
        assert (after - expected).abs().max() < 0.1, (after - expected).abs().max()
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_gpu_settings_are_refused_before_ray_starts(tiny_recipe_dict):
    from csr_plugin.config import ConfigError, recipe_from_dict
    from csr_plugin.openrlhf.ppo import check_cpu_recipe

    base = dict(tiny_recipe_dict, ppo={"colocate_all": False, "attn_implementation": "sdpa"})
    check_cpu_recipe(recipe_from_dict(base))
    for change, fix in [({"colocate_all": True}, "ppo.colocate_all=false"),
                        ({"attn_implementation": "flash_attention_2"}, "ppo.attn_implementation=sdpa"),
                        ({"vllm_tp": 2}, "ppo.vllm_tp=1")]:
        with pytest.raises(ConfigError, match=fix):
            check_cpu_recipe(recipe_from_dict(dict(base, ppo={**base["ppo"], **change})))


def test_train_ppo_end_to_end_on_cpu(tiny_recipe_dict, tmp_path):
    """A short `csr train-ppo` (3 rollout and training steps) in a process of its own: OpenRLHF's
    trainer, reference and vLLM actors on a local Ray cluster, our agent in the engine, the step-wise
    reward patch in the trainer actor, weight sync after every step, checkpoints that reload."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForImageTextToText

    recipe = json.loads(json.dumps(tiny_recipe_dict))
    # 6 prompts on 2 images: every step after the first meets an image vLLM encoded before the weight
    # sync, whose cached encoder output the sync must drop in the scheduler and the worker alike
    source = Path(recipe["data"]["prompts"])
    rows = [json.loads(line) for line in source.read_text().splitlines()][:6]
    images = [str((source.parent / rows[i]["image"]).resolve()) for i in (0, 1)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(dict(row, image=images[i % 2])) + "\n" for i, row in enumerate(rows)))
    recipe["data"]["prompts"] = str(prompts)
    recipe.update(output_dir=str(tmp_path / "out"), logging={"tensorboard": True})
    recipe["search"].update(beam_width=1, candidates=1, keep_top=1, keep_bottom=0, temperature=1.0, top_p=1.0)
    recipe["curation"] = {"length_normalize": False}
    # 6 prompts / 2 per rollout = 3 steps; an lr that moves bf16 weights visibly in 3 steps
    recipe["ppo"] = {"n_samples_per_prompt": 2, "rollout_batch": 2, "micro_rollout_batch": 2, "train_batch": 4,
                     "micro_train_batch": 2, "nodes": 1, "gpus_per_node": 1, "vllm_engines": 1,
                     "colocate_all": False, "attn_implementation": "sdpa", "gradient_checkpointing": False,
                     "max_len": 1024, "ckpt_steps": 1, "actor_lr": 1.0e-3}
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "train-ppo", "--config", str(config)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout + done.stderr + "".join(
        (out / "logs").glob("*.log").__next__().read_text().splitlines(True)[-40:])
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) < 10 and "csr train-ppo: done" in lines[-1], lines   # quiet: the rest is in logs/

    events = EventAccumulator(str(next((out / "ppo" / "tensorboard").iterdir())))
    events.Reload()
    assert [e.step for e in events.Scalars("train/reward")] == [1, 2, 3]
    # the step-wise reward patch ran in the trainer actor: it logs each step's group baseline b_g
    assert [e.step for e in events.Scalars("train/step_reward_baseline")] == [1, 2, 3]
    ckpt = out / "ppo" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("global_step*_hf")) == [f"global_step{i}_hf" for i in (1, 2, 3)]
    assert (ckpt / "_actor" / "latest").read_text().strip() == "global_step3"   # DeepSpeed's, for a resume

    from transformers import AutoProcessor

    for folder in [out / "ppo" / "final", *ckpt.glob("global_step*_hf")]:   # loadable as a VLM, processor too
        assert AutoProcessor.from_pretrained(folder).image_processor is not None
    start = AutoModelForImageTextToText.from_pretrained(recipe["model"]["path"], dtype=torch.float32)
    final = AutoModelForImageTextToText.from_pretrained(out / "ppo" / "final", dtype=torch.float32)
    start_params, final_params = dict(start.named_parameters()), dict(final.named_parameters())
    assert start_params.keys() == final_params.keys()
    moved = [n for n in start_params if not torch.equal(start_params[n].bfloat16(), final_params[n].bfloat16())]
    assert moved and not [n for n in moved if "vision_tower" in n]   # trained; the vision encoder frozen

    # what the workers did, from their logs: vLLM reloaded the weights after each of the 3 steps
    worker_logs = "".join(p.read_text(errors="replace") for p in (out / "logs" / "ray_session").glob("worker-*"))
    assert worker_logs.count("Reloading weights inplace") >= 1


def test_max_len_beyond_the_model_context_is_refused_before_ray_starts(tiny_recipe_dict):
    from csr_plugin.config import ConfigError, recipe_from_dict
    from csr_plugin.openrlhf.ppo import check_context

    check_context(recipe_from_dict(dict(tiny_recipe_dict, ppo={"max_len": 1024})))   # the tiny LLaVA's limit
    with pytest.raises(ConfigError, match=r"ppo.max_len=1025 .*context \(1024 tokens\): set ppo.max_len <= 1024"):
        check_context(recipe_from_dict(dict(tiny_recipe_dict, ppo={"max_len": 1025})))


@pytest.mark.parametrize("search", [{"decoding": "pargs", "rm": "runs/rm/final"},
                                    {"decoding": "group_beam"}])
def test_a_decoding_vllm_rollouts_cannot_run_is_refused_not_ignored(tiny_recipe_dict, search):
    """PPO's plain one-request rollouts never reach the vLLM engine's own refusal: without this check the
    recipe's decoding would silently be plain sampling."""
    from csr_plugin.config import ConfigError, recipe_from_dict
    from csr_plugin.openrlhf.ppo import check_decoding

    check_decoding(recipe_from_dict(tiny_recipe_dict))
    recipe = recipe_from_dict(dict(tiny_recipe_dict, search={**tiny_recipe_dict.get("search", {}), **search}))
    with pytest.raises(ConfigError, match=rf"search.decoding: {search['decoding']}` is not available in PPO"):
        check_decoding(recipe)
