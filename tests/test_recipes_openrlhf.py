"""Every recipe loads, `csr recipe show` prints its commands, and the OpenRLHF flags pass OpenRLHF's own checks.

OpenRLHF's train_ppo_ray imports vllm at module level: the real one (0.29, installed by
`make setup`); the parsers and assertions checked are OpenRLHF's own.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

import csr_plugin
from csr_plugin.config import ConfigError, load_recipe
from csr_plugin.openrlhf.cli_args import OpenRLHFArgsError, parse_openrlhf_args
from csr_plugin.openrlhf.ppo import AGENT_FILE, PPO_MODULE, WORKER_AGENT_FILE, ppo_flags, to_argv
from csr_plugin.recipe_commands import DPO_WORKER, check, show

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
    # the PPO commands whatever the recipe (show() prints them only for a recipe with a ppo: section)
    text = show(recipe, str(path), ["ppo.episodes=1"])
    ray_line = next(line for line in text.splitlines() if line.startswith("ray job submit"))
    argv = shlex.split(ray_line)
    entry = argv[argv.index("--") + 1:]
    assert entry[:5] == ["env", "TOKENIZERS_PARALLELISM=false", "python3", "-m", PPO_MODULE]
    # relative to the working_dir the job ships: the head node's AGENT_FILE does not exist on other nodes
    assert entry[entry.index("--train.agent_func_path") + 1] == WORKER_AGENT_FILE
    # PPO is checked by train_ppo_ray's parser only where the recipe has a ppo: section
    has_ppo = "ppo" in yaml.safe_load(path.read_text())
    expected = [DPO_WORKER, PPO_MODULE] if has_ppo else [DPO_WORKER]
    assert has_ppo == (path.name in ("ppo-stepwise.yaml", "toy-ppo.yaml"))
    assert check(recipe, str(path), []) == expected


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

    recipe = load_recipe(path, ["ppo.rollout_batch=8"])
    env = runtime_env(recipe)
    assert env["worker_process_setup_hook"] == HOOK and env["env_vars"][ENV_VAR] == "1"
    # the shipped recipe (prepare-only wrote it) already has the overrides: none travel on top of it
    assert env["env_vars"]["CSR_RECIPE"] == "recipe.yaml" and env["env_vars"]["CSR_RECIPE_OVERRIDES"] == "[]"
    assert Path(env["working_dir"]) == tmp_path / "out" / "ppo" / "ray_working_dir"
    assert (Path(env["working_dir"]) / "recipe.yaml").is_file() and (Path(env["working_dir"]) / "csr_agent.py").is_file()
    assert env["py_modules"] == [str(Path(csr_plugin.__file__).parent)]
    scalar = runtime_env(load_recipe(path, ["ppo.dense_rewards=false"]))
    assert "worker_process_setup_hook" not in scalar and ENV_VAR not in scalar["env_vars"]
    assert scalar["working_dir"] == env["working_dir"] and scalar["py_modules"] == env["py_modules"]

    if not __import__("torch").cuda.is_available():
        # the recipe's defaults are GPU settings: refused before Ray starts, naming the key and the fix
        assert main(["train-ppo", "--config", str(path)]) == 2
        assert "ppo.colocate_all=false" in capsys.readouterr().err


# -- how the recipe and its overrides reach Ray workers on other nodes (tests/test_multinode.py runs them) --

def test_overrides_travel_as_a_json_list_and_the_old_form_is_still_read(monkeypatch, tiny_recipe_dict, tmp_path):
    import yaml

    from csr_plugin.openrlhf.env_recipe import decode_overrides, encode_overrides, recipe_from_env

    overrides = ["reward.fusion=paper", "data.prompts=/a b/p.jsonl", "reward.lambda=0.5"]
    assert decode_overrides(encode_overrides(overrides)) == overrides
    assert decode_overrides("reward.lambda=0.5  clip.device=cpu") == ["reward.lambda=0.5", "clip.device=cpu"]
    assert decode_overrides("") == decode_overrides("  ") == decode_overrides("[]") == []
    with pytest.raises(ValueError, match="CSR_RECIPE_OVERRIDES=.*not valid JSON.*JSON list"):
        decode_overrides('["reward.lambda=0.5"')
    with pytest.raises(ValueError, match="must be a JSON list of key=value strings"):
        decode_overrides('[{"reward.lambda": 0.5}]')

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict))
    monkeypatch.setenv("CSR_RECIPE", str(path))
    monkeypatch.setenv("CSR_RECIPE_OVERRIDES", encode_overrides(overrides))
    recipe = recipe_from_env()
    assert recipe.data.prompts == "/a b/p.jsonl" and recipe.reward.lambda_ == 0.5   # split on spaces: refused
    monkeypatch.setenv("CSR_RECIPE", "recipe.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=r"CSR_RECIPE='recipe.yaml' is not a file on node .*working_dir"):
        recipe_from_env()


def _openrlhf_ray_init_env_vars() -> set[str]:
    """The env_vars keys OpenRLHF's train() passes to its own ray.init (read from its source, not imported:
    importing train_ppo_ray imports vLLM)."""
    import importlib.util
    import re

    source = Path(importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin).read_text()
    block = source[source.index("ray.init("):source.index("strategy = get_strategy(args)")]
    return set(re.findall(r'"([A-Z_]+)": os\.environ\.get', block))


def test_shell_commands_quote_every_path_and_override(tiny_recipe_dict, tmp_path):
    """`csr recipe show` lines pasted into a shell give back exactly the overrides, paths and runtime_env."""
    import json

    import yaml

    from csr_plugin.openrlhf.ppo import runtime_env, shell_commands

    out = tmp_path / "out dir"
    path = tmp_path / "my recipe.yaml"
    path.write_text(yaml.safe_dump(dict(tiny_recipe_dict, output_dir=str(out))))
    overrides = ["reward.fusion=paper", f"data.truth={tmp_path}/a b/t.jsonl", "ppo.rollout_batch=8"]
    recipe = load_recipe(path, overrides)
    prepare, submit = shell_commands(recipe, str(path), overrides)
    argv = shlex.split(prepare.split("   # ")[0])
    assert argv == ["csr", "train-ppo", "--config", str(path), *overrides, "--prepare-only"]

    argv = shlex.split(submit)
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    expected = runtime_env(recipe)
    tokenizers = expected["env_vars"].pop("TOKENIZERS_PARALLELISM")
    assert env == expected and env["working_dir"] == str(out / "ppo" / "ray_working_dir")
    entry = argv[argv.index("--") + 1:]
    assert entry[:2] == ["env", f"TOKENIZERS_PARALLELISM={tokenizers}"]
    assert entry[entry.index("--data.prompt_dataset") + 1] == str(out / "ppo" / "prompts.jsonl")
    assert entry[entry.index("--ckpt.path") + 1] == str(out / "ppo" / "ckpt")
    # Inside a job Ray refuses a ray.init env var the job's runtime_env also sets ("Failed to merge the
    # Job's runtime env"): OpenRLHF's train() sets these in its ray.init, so the job must not.
    openrlhf_keys = _openrlhf_ray_init_env_vars()
    assert "TOKENIZERS_PARALLELISM" in openrlhf_keys, "OpenRLHF's train() changed: recheck this"
    assert not openrlhf_keys & set(env["env_vars"])


def test_working_dir_ships_the_recipe_as_workers_load_it(monkeypatch, tiny_recipe_dict, tmp_path):
    """Relative paths are made absolute (shared storage), the CLIP config is copied, and the files OpenRLHF
    loads by path import our package."""
    import shutil

    import yaml

    from csr_plugin.openrlhf.env_recipe import recipe_from_env
    from csr_plugin.openrlhf.ppo import launch_flags, runtime_env, write_working_dir

    shutil.copytree(Path(tiny_recipe_dict["model"]["path"]), tmp_path / "models" / "vlm")
    monkeypatch.chdir(tmp_path)
    recipe_dict = dict(tiny_recipe_dict, output_dir="runs/x", model=dict(tiny_recipe_dict["model"], path="models/vlm"))
    Path("r.yaml").write_text(yaml.safe_dump(recipe_dict))
    recipe = load_recipe("r.yaml", ["reward.lambda=0.3"])
    folder = write_working_dir(recipe, "r.yaml", ["reward.lambda=0.3"])
    assert folder == tmp_path / "runs" / "x" / "ppo" / "ray_working_dir"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        ["clip/tiny-clip.json", "csr_agent.py", "csr_reward_func.py", "recipe.yaml"]
    assert (folder / "clip" / "tiny-clip.json").read_bytes() == Path(recipe.clip.config).read_bytes()
    assert "from csr_plugin.openrlhf.agent import AgentExecutor" in (folder / "csr_agent.py").read_text()
    assert "from csr_plugin.openrlhf.reward_func import reward_func" in (folder / "csr_reward_func.py").read_text()

    flags = launch_flags(recipe, "runs/x/ppo/prompts.jsonl")
    assert flags["actor.model_name_or_path"] == str(tmp_path / "models" / "vlm")
    assert flags["data.prompt_dataset"] == str(tmp_path / "runs" / "x" / "ppo" / "prompts.jsonl")
    assert flags["ckpt.output_dir"] == str(tmp_path / "runs" / "x" / "ppo" / "final")

    # a worker: started in (its copy of) the working_dir, with the runtime_env's variables
    monkeypatch.chdir(folder)
    for name, value in runtime_env(recipe)["env_vars"].items():
        monkeypatch.setenv(name, value)
    shipped = recipe_from_env()
    assert shipped.model.path == str(tmp_path / "models" / "vlm") and shipped.reward.lambda_ == 0.3
    assert shipped.output_dir == str(tmp_path / "runs" / "x")
    assert shipped.clip.config == "clip/tiny-clip.json" and Path(shipped.clip.config).is_file()
    assert shipped.clip.pretrained == tiny_recipe_dict["clip"]["pretrained"], "weights stay on shared storage"
