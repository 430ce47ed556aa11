"""Every recipe loads, `csr recipe show` prints its commands, and the OpenRLHF flags pass OpenRLHF's own checks.

OpenRLHF's train_ppo_ray imports vllm at module level: the real one (0.29, installed by
`make setup`); the parsers and assertions checked are OpenRLHF's own.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from csr_plugin.config import ConfigError, load_recipe
from csr_plugin.openrlhf.cli_args import OpenRLHFArgsError, parse_openrlhf_args
from csr_plugin.openrlhf.ppo import AGENT_FILE, PPO_MODULE, ppo_flags, to_argv
from csr_plugin.recipe_commands import check, show

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))

def test_the_issue_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"paper.yaml", "qwen25vl-7b-dpo.yaml", "ppo-stepwise.yaml", "toy.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_starts_with_its_launch_command(path):
    head = [line for line in path.read_text().splitlines()[:8] if line.startswith("#")]
    assert any(line.lstrip("# ").startswith("csr ") for line in head), f"{path.name}: no launch command on top"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_commands_pass_openrlhf_parsers(path):
    recipe = load_recipe(path, [])
    text = show(recipe, str(path), [])
    assert f"csr run --config {path}" in text
    ray_line = next(line for line in text.splitlines() if line.startswith("ray job submit"))
    argv = shlex.split(ray_line)
    assert argv[argv.index("--") + 1:][:3] == ["python3", "-m", PPO_MODULE]
    assert str(AGENT_FILE) in argv
    assert check(recipe, str(path), []) == ["openrlhf.cli.train_dpo", PPO_MODULE]


def test_ppo_flags_land_where_openrlhf_reads_them():
    recipe = load_recipe(RECIPES[0].with_name("ppo-stepwise.yaml"), ["ppo.estimator=rloo", "ppo.lora_rank=16",
                                                                     "ppo.vllm_enforce_eager=true"])
    args = parse_openrlhf_args(PPO_MODULE, to_argv(ppo_flags(recipe, "prompts.jsonl")))
    assert args.algo.advantage.estimator == "rloo"
    assert args.train.agent_func_path == str(AGENT_FILE)
    assert args.reward.remote_url == ["agent"]  # OpenRLHF's own post-parse rewrite for agent runs
    assert tuple(args.reward.clip_range) == (-100.0, 100.0)
    assert args.rollout.n_samples_per_prompt == 4 and args.rollout.batch_size == 64
    assert args.rollout.max_new_tokens == recipe.search.max_new_tokens * recipe.search.max_sentences
    assert args.ds.lora.rank == 16 and args.actor.freeze_visual_encoder and args.data.apply_chat_template
    assert args.vllm.enable_prefix_caching and args.vllm.enforce_eager


def test_openrlhf_rejections_surface_as_config_errors():
    with pytest.raises(OpenRLHFArgsError, match="unrecognized arguments: --no.such.flag"):
        parse_openrlhf_args(PPO_MODULE, ["--actor.model_name_or_path", "m", "--no.such.flag", "1"])
    # what we learnt from OpenRLHF's checks: no critic for VLMs, so gae is refused when the recipe loads
    with pytest.raises(OpenRLHFArgsError, match="critic"):
        parse_openrlhf_args(PPO_MODULE, ["--actor.model_name_or_path", "m", "--critic.model_name_or_path", "m",
                                         "--algo.advantage.estimator", "gae", "--data.max_images_per_prompt", "1"])
    # OpenRLHF's own post-parse assertion: fewer sample batches than actor ranks
    with pytest.raises(OpenRLHFArgsError, match="effective number of actor processes"):
        parse_openrlhf_args(PPO_MODULE, ["--actor.model_name_or_path", "m", "--algo.advantage.estimator", "reinforce",
                                         "--rollout.batch_size", "1",
                                         "--rollout.micro_batch_size", "4", "--actor.num_gpus_per_node", "8"])
    recipe_path = RECIPES[0].with_name("ppo-stepwise.yaml")
    with pytest.raises(ConfigError, match="rollout_batch"):
        ppo_flags(load_recipe(recipe_path, ["ppo.rollout_batch=1", "ppo.n_samples_per_prompt=2"]), "p.jsonl")


def test_group_estimator_needs_a_group_and_gae_is_refused():
    with pytest.raises(ConfigError, match="n_samples_per_prompt"):
        load_recipe(RECIPES[0].with_name("ppo-stepwise.yaml"), ["ppo.n_samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="critic"):
        load_recipe(RECIPES[0].with_name("ppo-stepwise.yaml"), ["ppo.estimator=gae"])


def test_recipe_show_cli(capsys):
    from csr_plugin.cli import main

    path = str(RECIPES[0].with_name("qwen25vl-7b-dpo.yaml"))
    assert main(["recipe", "show", path, "dpo.nproc=4"]) == 0
    out = capsys.readouterr().out
    assert "--nproc_per_node=4" in out and "Qwen/Qwen2.5-VL-7B-Instruct" in out
    assert "csr_plugin.training.dpo_main" in out


def test_train_ppo_prepares_openrlhf_prompts_and_its_ray_environment(tiny_recipe_dict, tmp_path, capsys):
    import json

    import yaml

    from csr_plugin.cli import main
    from csr_plugin.openrlhf.dense_rewards import ENV_VAR, HOOK
    from csr_plugin.openrlhf.ppo import runtime_env

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(dict(tiny_recipe_dict, output_dir=str(tmp_path / "out"))))
    assert main(["train-ppo", "--config", str(path), "--prepare-only", "ppo.rollout_batch=8"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "ppo" / "prompts.jsonl").read_text().splitlines()]
    source = [json.loads(line) for line in open(tiny_recipe_dict["data"]["prompts"])]
    assert len(rows) == len(source)
    for row, record in zip(rows, source):
        # OpenRLHF's chat templating turns the <image> tag into the user message's image entry
        assert row["input"] == "<image>" + record["question"]
        label = json.loads(row["label"])
        assert label["id"] == record["id"] and row["images"] == [label["image"]] and Path(label["image"]).is_file()

    recipe = load_recipe(path, [])
    env = runtime_env(recipe, str(path), ["reward.lambda=0.5"])
    assert env["worker_process_setup_hook"] == HOOK and env["env_vars"][ENV_VAR] == "1"
    assert env["env_vars"]["CSR_RECIPE"] == str(path.resolve())
    assert env["env_vars"]["CSR_RECIPE_OVERRIDES"] == "reward.lambda=0.5"
    scalar = runtime_env(load_recipe(path, ["ppo.dense_rewards=false"]), str(path), [])
    assert "worker_process_setup_hook" not in scalar and ENV_VAR not in scalar["env_vars"]

    if not __import__("torch").cuda.is_available():
        assert main(["train-ppo", "--config", str(path)]) == 2
        assert "needs GPUs" in capsys.readouterr().err
