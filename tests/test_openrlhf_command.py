"""docs/openrlhf.md's plain `train_ppo_ray` command, "One `train_ppo_ray` command for a multi-node cluster":

- it is what `csr train-ppo` / `csr recipe show` run for the same recipe and overrides (so it cannot drift);
- OpenRLHF's own parser and assertions take its flags;
- its agent part runs as written on a simulated two-node Ray cluster: the block's runtime_env (with a tiny
  recipe's working_dir), its `--train.agent_func_path`, and OpenRLHF's own loader on the second node.

And docs/distributed.md's DPO node launchers are the ones tests/test_multinode.py runs on two nodes.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from csr_plugin.cli import build_parser
from csr_plugin.config import load_recipe
from csr_plugin.openrlhf.ppo import PPO_MODULE, shell_commands
from test_multinode import two_nodes  # noqa: F401 - fixture: a head and a second Ray node on this machine
from test_quiet import restore_logging  # noqa: F401 - fixture: cli.main sets up logging

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## One `train_ppo_ray` command for a multi-node cluster"


def doc_commands() -> tuple[list[str], list[str]]:
    """The section's (prepare command, ray job submit command), as shell words, continuations joined."""
    text = (ROOT / "docs" / "openrlhf.md").read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").strip().splitlines()
    assert len(lines) == 2, lines
    return shlex.split(lines[0]), shlex.split(lines[1])


def split_submit(words: list[str]) -> tuple[dict, list[str]]:
    """`ray job submit ... --runtime-env-json J -- ENTRY...` -> (J, ENTRY)."""
    assert words[:3] == ["ray", "job", "submit"], words[:3]
    return json.loads(words[words.index("--runtime-env-json") + 1]), words[words.index("--") + 1:]


def test_the_doc_command_is_what_csr_runs_for_that_recipe(monkeypatch):
    prepare, submit = doc_commands()
    assert prepare[:2] == ["csr", "train-ppo"] and "--prepare-only" in prepare
    args = build_parser().parse_args(prepare[1:])
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(args.config, args.overrides)
    assert recipe.ppo.nodes >= 2, "the block is the multi-node command"
    expected = next(c for c in shell_commands(recipe, args.config, args.overrides) if c.startswith("ray job submit"))
    doc_env, doc_entry = split_submit(submit)
    code_env, code_entry = split_submit(shlex.split(expected))
    # this machine's flash-attn install (no CUDA kernels) adds the Triton switch; the doc's GPU nodes need none
    code_env["env_vars"].pop("FLASH_ATTENTION_TRITON_AMD_ENABLE", None)
    # py_modules: the doc's path is relative to the clone's root, where the block is run
    assert [str((ROOT / p).resolve()) for p in doc_env.pop("py_modules")] == code_env.pop("py_modules")
    assert doc_env == code_env
    assert doc_entry == code_entry
    assert doc_entry[doc_entry.index("--train.agent_func_path") + 1] == "csr_agent.py"   # valid on every node


def test_openrlhf_takes_the_doc_command():
    pytest.importorskip("vllm")   # train_ppo_ray imports it at module level
    from csr_plugin.openrlhf.cli_args import parse_openrlhf_args

    _, submit = doc_commands()
    _, entry = split_submit(submit)
    assert entry[:5] == ["env", "TOKENIZERS_PARALLELISM=false", "python3", "-m", PPO_MODULE]
    args = parse_openrlhf_args(PPO_MODULE, entry[5:])
    assert args.train.agent_func_path == "csr_agent.py" and args.actor.num_nodes == 2
    assert args.vllm.num_engines == 16 and args.data.prompt_dataset == "/shared/runs/csr-ppo/ppo/prompts.jsonl"


@pytest.mark.slow   # a two-node Ray cluster and a worker importing vLLM through OpenRLHF's loader
def test_the_doc_agent_runs_as_written_on_the_second_node(two_nodes, tiny_recipe_dict, tmp_path, monkeypatch,
                                                          restore_logging):
    import ray
    import test_multinode
    from test_multinode import _probe_worker, _tiny_recipe

    from csr_plugin.accelerator import flash_attn_env
    from csr_plugin.cli import main

    cluster, head, second = two_nodes
    # the block's first command, with a tiny recipe in place of the 7B one and paths of this machine
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(_tiny_recipe(tiny_recipe_dict, tmp_path / "out")))
    prepare, submit = doc_commands()
    args = build_parser().parse_args(prepare[1:])
    overrides = [o for o in args.overrides if not o.startswith(("data.prompts=", "output_dir="))]
    assert main(["train-ppo", "--config", str(config), *overrides, "--prepare-only"]) == 0
    env, entry = split_submit(submit)
    env["working_dir"] = str(tmp_path / "out" / "ppo" / "ray_working_dir")
    env["env_vars"].update(flash_attn_env())   # this machine's flash-attn install (see the doc's last note)
    agent_path = entry[entry.index("--train.agent_func_path") + 1]

    monkeypatch.chdir(ROOT)   # where the block runs: "py_modules": ["csr_plugin"] is relative to it
    ray.cloudpickle.register_pickle_by_value(test_multinode)
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
    try:
        probe = ray.remote(_probe_worker).options(num_cpus=1, resources={"second": 1}, max_retries=0)
        seen = ray.get(probe.remote(agent_path), timeout=600)
    finally:
        ray.shutdown()

    assert seen["node"] == second != head
    assert seen["executor"] == "csr_plugin.openrlhf.agent.AgentExecutor"
    assert seen["agent_file"] == str(Path(seen["cwd"]) / "csr_agent.py")
    assert "/runtime_resources/py_modules_files/" in seen["executor_file"]   # the shipped package, not the clone
    assert seen["env"]["CSR_RECIPE"] == "recipe.yaml" and seen["hook_installed"]
    assert seen["output_dir"] == str(tmp_path / "out")


def test_the_doc_dpo_launchers_are_the_ones_the_two_node_test_runs():
    """docs/distributed.md's per-node torchrun commands are what tests/test_multinode.py starts on two
    simulated nodes (there with 1 rank per node, loopback and a free port)."""
    from test_multinode import _node_launcher

    text = (ROOT / "docs" / "distributed.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("## `csr train-dpo`: one torchrun launcher"):], re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2
    for rank, words in enumerate(commands):
        expected = _node_launcher(Path("recipe.yaml"), rank, 29500)
        expected[0] = "python"
        expected[expected.index("--nproc-per-node") + 1] = "8"
        expected[expected.index("--master-addr") + 1] = "10.0.0.1"
        assert words[:len(expected)] == expected, (rank, words)
        assert all("=" in w for w in words[len(expected):])   # then only recipe overrides
