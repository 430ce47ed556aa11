"""Several nodes, simulated on one machine.

- Ray: a two-node cluster made with Ray's own ``ray.cluster_utils.Cluster`` (two raylets on 127.0.0.1, one
  CPU each), joined by its address, as a driver joins a real cluster;
- DPO and the reward model: two torchrun node launchers (``--nnodes 2 --node-rank 0/1``) meeting on loopback.

What this cannot show: real network between machines, separate file systems (here every "node" sees the
same disk, so the tests check *where* a worker found each file rather than whether it could), GPUs.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from csr_plugin.config import load_recipe, recipe_from_dict
from csr_plugin.jsonl import load_records
from csr_plugin.sampling.local import sample
from csr_plugin.training.launch import free_port

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node, one CPU each, so two one-CPU actors cannot share a node.

    Custom resources ``head`` / ``second`` let a test place work on one node on purpose."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        # Cluster records its address in /tmp/ray/ray_current_cluster, where every `ray.init()` without an
        # address on this machine (another test run, another user) would find it and join it, or fail on it
        # once it is gone. We always connect by address, so nothing needs the record.
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        cluster = Cluster(initialize_head=True, head_node_args={
            # no GCS port, dashboard port 0, no dashboard-agent port (52365 by default): the OS picks free
            # ones, so two runs at once do not collide (Cluster already does this for the second node)
            "num_cpus": 1, "resources": {"head": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "dashboard_port": 0, "dashboard_agent_listen_port": None})
    # The nodes listen on 127.0.0.1 only. ray.init(address="127.0.0.1:port") would rewrite that to this
    # machine's network address (so that other machines could reach it) and find nothing there; with the
    # cluster switch off, Ray keeps loopback, as on a laptop. Only this process (the driver) is affected.
    patch = pytest.MonkeyPatch()
    patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    try:
        second = cluster.add_node(num_cpus=1, resources={"second": 1}, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster, cluster.head_node.node_id, second.node_id
    finally:
        patch.undo()
        cluster.shutdown()


def _tiny_recipe(tiny_recipe_dict, out: Path, **search) -> dict:
    data = json.loads(json.dumps(tiny_recipe_dict))
    data["output_dir"] = str(out)
    data["search"].update({"max_sentences": 2, "max_new_tokens": 8, "batch_prompts": 1}, **search)
    return data


# -- a. `csr sample --ray` on two nodes -------------------------------------------------------------------

def test_sampling_actors_run_on_both_nodes_and_write_the_same_trees_as_one_process(two_nodes, tiny_recipe_dict,
                                                                                   tmp_path):
    from csr_plugin.sampling.ray_driver import sample_on_ray

    cluster, head, second = two_nodes
    sample(recipe_from_dict(_tiny_recipe(tiny_recipe_dict, tmp_path / "serial")), progress=False)
    expected = {tree["id"]: tree for tree in load_records(tmp_path / "serial" / "trees.jsonl")}

    nodes = {}

    def where_the_actors_run(done, actors):
        for actor in actors:
            nodes[actor._actor_id.hex()] = ray._private.state.actors(actor._actor_id.hex())["Address"]["NodeID"]

    recipe = recipe_from_dict(_tiny_recipe(tiny_recipe_dict, tmp_path / "ray"))
    summary = sample_on_ray(recipe, num_actors=2, address=cluster.address, progress=False,
                            on_progress=where_the_actors_run)
    assert not ray.is_initialized(), "the driver leaves a cluster it joined (and does not stop it)"
    assert set(nodes.values()) == {head, second}, f"one actor per node: {nodes}"
    assert (summary.done, sum(summary.skipped.values())) == (len(expected), 0)
    trees = load_records(tmp_path / "ray" / "trees.jsonl")
    assert sorted(t["id"] for t in trees) == sorted(expected), "every prompt exactly once"
    for tree in trees:
        want = expected[tree["id"]]
        assert [(n["parent"], n["text"], n["token_ids"]) for n in tree["nodes"]] == \
               [(n["parent"], n["text"], n["token_ids"]) for n in want["nodes"]]
        # CLIP batches differ between the runs (chunks of one prompt here): float rounding only
        assert [n["reward"] for n in tree["nodes"]] == pytest.approx([n["reward"] for n in want["nodes"]], rel=1e-5)


# -- b. the PPO runtime_env carries the package, the recipe and the agent file ------------------------------

def _probe_worker(agent_func_path: str) -> dict:
    """Runs in a Ray worker on the second node: what OpenRLHF's vLLM actor does with our flags, and where
    everything it used came from."""
    import os
    import sys
    from pathlib import Path

    import ray

    import csr_plugin
    # OpenRLHF's own loader, the function its RolloutRayActor calls with --train.agent_func_path
    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

    executor = _load_agent_executor(agent_func_path)
    recipe = executor.recipe   # read through CSR_RECIPE, as the executor OpenRLHF builds reads it
    dense = sys.modules.get("csr_plugin.openrlhf.dense_rewards")
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "cwd": os.getcwd(),
        "package": csr_plugin.__file__,
        "agent_file": str(Path(agent_func_path).resolve()),
        "executor": f"{type(executor).__module__}.{type(executor).__qualname__}",
        "executor_file": sys.modules[type(executor).__module__].__file__,
        "clip_config": str(Path(recipe.clip.config).resolve()),
        "lambda": recipe.reward.lambda_,
        "truth": recipe.data.truth,
        "output_dir": recipe.output_dir,
        "env": {k: os.environ.get(k) for k in ("CSR_RECIPE", "CSR_RECIPE_OVERRIDES", "CSR_DENSE_REWARDS")},
        "hook_file": dense.__file__ if dense else None,
        "hook_installed": any(type(f).__name__ == "_PatchOnImport" for f in sys.meta_path),
    }


@pytest.mark.slow   # the worker imports vLLM (through OpenRLHF's loader): 12-30 s on 2 shared cores
def test_ppo_runtime_env_ships_package_recipe_and_agent_to_the_second_node(two_nodes, tiny_recipe_dict, tmp_path):
    from csr_plugin.openrlhf.ppo import launch_flags, ppo_dir, runtime_env, write_working_dir

    cluster, head, second = two_nodes
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(_tiny_recipe(tiny_recipe_dict, tmp_path / "out")))
    truth = tmp_path / "a b" / "truth.jsonl"   # an override whose value holds a space
    overrides = ["reward.lambda=0.25", f"data.truth={truth}"]
    recipe = load_recipe(config, overrides)
    folder = write_working_dir(recipe, str(config), overrides)
    flags = launch_flags(recipe, ppo_dir(recipe) / "prompts.jsonl")

    # the probe travels by value: a worker started in the shipped working_dir cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # what train_ppo does: the runtime_env of the whole job, so every worker OpenRLHF starts gets it
    ray.init(address=cluster.address, runtime_env=runtime_env(recipe), log_to_driver=False)
    try:
        probe = ray.remote(_probe_worker).options(num_cpus=1, resources={"second": 1}, max_retries=0)
        seen = ray.get(probe.remote(flags["train.agent_func_path"]), timeout=600)
    finally:
        ray.shutdown()

    assert seen["node"] == second != head
    # Ray starts the worker in its own copy of the working_dir and puts its own copy of csr_plugin first
    # on the path: neither is the folder we wrote nor this checkout
    assert "/runtime_resources/working_dir_files/" in seen["cwd"] and Path(seen["cwd"]) != folder
    for key in ("package", "executor_file", "hook_file"):
        assert "/runtime_resources/py_modules_files/" in seen[key], (key, seen[key])
        assert not seen[key].startswith(str(REPO)), (key, seen[key])
    assert seen["agent_file"] == str(Path(seen["cwd"]) / "csr_agent.py")
    assert seen["executor"] == "csr_plugin.openrlhf.agent.AgentExecutor"
    # the recipe: the shipped copy, overrides applied (a value with a space intact); its CLIP config: the
    # shipped copy, which the executor's constructor has already built the tiny CLIP from ("tiny-clip" is
    # no open_clip model: it exists only once that file is registered)
    assert seen["env"] == {"CSR_RECIPE": "recipe.yaml", "CSR_RECIPE_OVERRIDES": "[]", "CSR_DENSE_REWARDS": "1"}
    assert (seen["lambda"], seen["truth"]) == (0.25, str(truth))
    assert seen["clip_config"] == str(Path(seen["cwd"]) / "clip" / "tiny-clip.json")
    assert seen["output_dir"] == str(tmp_path / "out"), "outputs go to the shared path, not the worker's copy"
    assert seen["hook_installed"], "the step-wise reward hook ran in the worker"


# -- c. `csr train-dpo` as two torchrun node launchers ------------------------------------------------------

def _dpo_recipe(tiny_recipe_dict, tmp_path: Path, name: str, pairs: Path) -> Path:
    data = json.loads(json.dumps(tiny_recipe_dict))
    data["output_dir"] = str(tmp_path / name)
    # 4 pairs, 2 ranks, micro-batch 1, batch 2: two optimizer steps, each reducing gradients across ranks
    data["dpo"] = {"pairs": str(pairs), "nproc": 2, "zero_stage": 3, "batch": 2, "micro_batch": 1, "epochs": 1,
                   "lr": 1.0e-3, "ckpt_steps": 0}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _node_launcher(config: Path, node_rank: int, port: int, command: str = "train-dpo") -> list[str]:
    """One node's launcher, exactly as docs/distributed.md gives it (there with the head's address)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "csr_plugin.cli", command, "--config", str(config)]


def _run_node_launchers(config: Path, command: str, env: dict) -> list[str]:
    """Both nodes' launchers at once on a free port; their outputs, after both succeeded."""
    port = free_port()
    launchers = [subprocess.Popen(_node_launcher(config, rank, port, command), cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    outputs = []
    for rank, launcher in enumerate(launchers):
        try:
            output, _ = launcher.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in launchers:
                other.kill()
            raise
        assert launcher.returncode == 0, f"node {rank}:\n{output[-4000:]}"
        outputs.append(output)
    return outputs


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.slow   # two DPO runs of two ZeRO-3 ranks each: ~80 s on 2 shared cores
def test_dpo_on_two_node_launchers_equals_one_node_with_two_ranks(tiny_recipe_dict, tmp_path):
    import torch
    from test_launch import _pairs

    pairs = _pairs(tmp_path / "data", 4)
    # one thread per rank in both runs: the same CPU kernels, so the same float results
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # gloo finds its interface from the host name; on loopback both "nodes" meet on 127.0.0.1
    env["GLOO_SOCKET_IFNAME"] = "lo"
    two_nodes_cfg = _dpo_recipe(tiny_recipe_dict, tmp_path, "two_nodes", pairs)
    outputs = _run_node_launchers(two_nodes_cfg, "train-dpo", env)
    assert (tmp_path / "two_nodes" / "final" / ".complete").exists()
    # one world across the two launchers: ZeRO-3 gives the rank on node 0 half of the parameters
    held = re.search(r"ZeRO-3: rank 0 holds (\d+)/(\d+) parameter elements", outputs[0])
    assert held and 0.45 < int(held.group(1)) / int(held.group(2)) < 0.55, outputs[0][-3000:]

    one_node_cfg = _dpo_recipe(tiny_recipe_dict, tmp_path, "one_node", pairs)
    done = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "train-dpo", "--config", str(one_node_cfg)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    two, one = _weights(tmp_path / "two_nodes" / "final"), _weights(tmp_path / "one_node" / "final")
    base = _weights(Path(tiny_recipe_dict["model"]["path"]))
    assert two.keys() == one.keys()
    assert any(not torch.equal(one[k], base[k]) for k in one if k in base), "training changed the weights"
    # Same world size, same rank -> data shard mapping, same seed, one thread per rank, and gloo's sum of two
    # ranks' gradients is a + b either way round (float addition of two terms commutes): the two runs do
    # the same arithmetic, so any difference at all means they trained differently.
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=0, atol=0), name


# -- d. `csr train-rm` as two torchrun node launchers -------------------------------------------------------

def _rm_recipe(tiny_recipe_dict, tmp_path: Path, name: str, pairs: Path) -> Path:
    data = json.loads(json.dumps(tiny_recipe_dict))
    data["output_dir"] = str(tmp_path / name)
    # 6 pair ids, 2 held out (round(0.34 x 6)), 4 trained: 2 ranks, micro-batch 1, batch 2 -> two optimizer
    # steps, then the held-out pairs scored one per rank. lr_scheduler through rm.openrlhf: every step's lr in
    # rm_metrics.jsonl is then rm.lr, which shows the passthrough reached the ranks' optimizer schedule.
    data["rm"] = {"pairs": str(pairs), "nproc": 2, "zero_stage": 3, "batch": 2, "micro_batch": 1, "epochs": 1,
                  "lr": 1.0e-3, "ckpt_steps": 0, "eval_fraction": 0.34, "openrlhf": {"lr_scheduler": "constant"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow   # two reward model runs of two ZeRO-3 ranks each: 60-120 s on 2 shared cores
def test_rm_on_two_node_launchers_equals_one_node_with_two_ranks(tiny_recipe_dict, tmp_path):
    import torch
    from test_launch import _pairs

    pairs = _pairs(tmp_path / "data", 6)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}   # as in the DPO test above
    outputs = _run_node_launchers(_rm_recipe(tiny_recipe_dict, tmp_path, "two_nodes", pairs), "train-rm", env)
    two_nodes = tmp_path / "two_nodes"
    assert (two_nodes / "final" / ".complete").exists()
    held = re.search(r"ZeRO-3: rank 0 holds (\d+)/(\d+) parameter elements", outputs[0])
    assert held and 0.45 < int(held.group(1)) / int(held.group(2)) < 0.55, outputs[0][-3000:]
    assert "ZeRO-3: rank 0 holds" not in outputs[1], "only global rank 0 prints: one world, not two"

    one_node = tmp_path / "one_node"
    done = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "train-rm", "--config",
                           str(_rm_recipe(tiny_recipe_dict, tmp_path, "one_node", pairs))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # rank 0 alone writes the metrics: each step once, then the held-out numbers over both ranks' pairs
    rows = [json.loads(line) for line in (two_nodes / "rm_metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 2] and rows[-1]["eval_pairs"] == 2
    assert all(r["lr"] == 1.0e-3 for r in rows[:2]), rows
    assert rows == [json.loads(line) for line in (one_node / "rm_metrics.jsonl").read_text().splitlines()]

    two, one = _weights(two_nodes / "final"), _weights(one_node / "final")   # backbone and reward head
    base = _weights(Path(tiny_recipe_dict["model"]["path"]))
    assert two.keys() == one.keys() and {"weight", "bias"} <= one.keys()
    assert any(not torch.equal(one[k], base[k]) for k in one if k in base), "training changed the weights"
    for name in one:   # the same arithmetic as in the DPO test above: bit for bit
        assert torch.equal(two[name], one[name]), name
    meta = [json.loads((folder / "final" / "reward_model.json").read_text()) for folder in (two_nodes, one_node)]
    assert meta[0]["held_out"] == meta[1]["held_out"] and meta[0]["train_pairs"] == 4


# -- e. `csr run` sampling on the two-node cluster ------------------------------------------------------------

def test_default_actors_are_one_per_gpu_of_the_cluster():
    from csr_plugin.sampling.ray_driver import default_actors

    assert default_actors(16.0, use_gpu=True) == 16    # two 8-GPU nodes
    assert default_actors(0.0, use_gpu=False) == 2 and default_actors(8.0, use_gpu=False) == 2


@pytest.mark.slow   # two 2-iteration CSR loops, each with two DPO runs of two ZeRO-3 ranks: ~3 min on 2 shared cores
def test_csr_run_sampling_on_the_two_node_cluster_gives_the_pairs_of_a_local_run(two_nodes, tiny_recipe_dict,
                                                                                    tmp_path):
    import yaml

    from csr_plugin.pipeline import run
    from csr_plugin.toy.quickstart import write_prompts

    cluster, head, second = two_nodes
    prompts = write_prompts(tmp_path / "prompts", 6, seed=5)

    def loop(name, **loop_keys):
        data = _tiny_recipe(tiny_recipe_dict, tmp_path / name, batch_prompts=2)
        data["data"]["prompts"] = str(prompts)
        data["dpo"] = {"nproc": 2, "zero_stage": 3, "batch": 2, "micro_batch": 1, "epochs": 1, "lr": 1.0e-3,
                       "ckpt_steps": 0}
        data["loop"] = {"iterations": 2, **loop_keys}
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(data))
        return run(str(config)), tmp_path / name

    _, local = loop("local")
    _, on_ray = loop("ray", sample_on="ray", ray_address=cluster.address, ray_actors=2)
    assert not ray.is_initialized(), "each sampling stage leaves the cluster it joined"
    for t in (1, 2):
        trees = [r["id"] for r in load_records(on_ray / f"iter_{t}" / "trees.jsonl")]
        assert sorted(trees) == sorted(set(trees)) and len(trees) == 6, "every prompt once"
        mine, theirs = (load_records(folder / f"iter_{t}" / "pairs.jsonl") for folder in (on_ray, local))
        assert [(p["id"], p["chosen"], p["rejected"]) for p in mine] == \
               [(p["id"], p["chosen"], p["rejected"]) for p in theirs], f"iteration {t}: the same pairs"
        # CLIP batches differ between the runs (chunks of prompts on two actors): float rounding only
        assert [p["chosen_reward"] for p in mine] == pytest.approx([p["chosen_reward"] for p in theirs], rel=1e-5)
