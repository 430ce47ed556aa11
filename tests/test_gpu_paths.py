"""GPU-only decisions, exercised on a CPU: which device PPO picks for a cluster, where CLIP goes in a
tensor-parallel engine, the engine arguments vLLM gets on a GPU, flash-attn's switch and attention
fallback, and the evaluator's model released before the next stage.

Ray clusters are simulated as in test_multinode.py (``ray.cluster_utils.Cluster`` on 127.0.0.1); a node
that declares GPUs gets GPU ids from Ray without having any. What this cannot show: a real GPU, vLLM's
own start-up check of free memory, NCCL (scripts/gpu_check.sh is the GPU acceptance run)."""
from __future__ import annotations

import gc
import json
import weakref

import pytest

from csr_plugin.config import ConfigError, recipe_from_dict

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")


@pytest.fixture(scope="module")
def cluster():
    """A head node without GPUs; tests add a node that declares two."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        made = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "dashboard_port": 0,
            "dashboard_agent_listen_port": None})
    patch = pytest.MonkeyPatch()
    patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)   # keep 127.0.0.1 (test_multinode.py)
    try:
        yield made
    finally:
        patch.undo()
        made.shutdown()


def test_ppo_device_comes_from_the_cluster_not_from_the_driver(cluster, tiny_recipe_dict):
    """The driver here has no CUDA; a cluster whose node declares GPUs gets the GPU path (no CPU stand-ins),
    one without GPUs is refused rather than left to hang on OpenRLHF's GPU placement groups."""
    import torch

    from csr_plugin.openrlhf.ppo import runs_on_cpu, runtime_env

    assert not torch.cuda.is_available()
    recipe = recipe_from_dict(dict(tiny_recipe_dict, ppo={"ray_address": cluster.address}))
    with pytest.raises(ConfigError, match=r"has no GPUs.*leave ppo.ray_address empty"):
        runs_on_cpu(recipe)
    assert not ray.is_initialized()   # the probe connection is closed: the job's own ray.init comes next
    node = cluster.add_node(num_cpus=1, num_gpus=2, node_ip_address="127.0.0.1")
    try:
        cluster.wait_for_nodes()
        assert runs_on_cpu(recipe) is False
        assert not ray.is_initialized()
        env = runtime_env(recipe, cpu=False)
        assert "CSR_CPU_PPO" not in env["env_vars"] and env.get("worker_process_setup_hook") != (
            "csr_plugin.openrlhf.ppo_on_cpu.setup_hook")
    finally:
        cluster.remove_node(node)
    # a local cluster (no ray_address) is this machine: no CUDA, the CPU stand-ins
    assert runs_on_cpu(recipe_from_dict(dict(tiny_recipe_dict, ppo={}))) is True


def test_clip_goes_to_the_gpu_of_its_tensor_parallel_engine(cluster):
    """Two engines with tp=1 bundle each (as OpenRLHF places them, vllm_tp > 1): each actor holds no GPU and
    sees the whole node, so "cuda" would be GPU 0 for both; engine_device reads its own bundle's GPU."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from csr_plugin.sampling.ray_actors import engine_device

    node = cluster.add_node(num_cpus=2, num_gpus=2, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False)
    try:
        group = placement_group([{"GPU": 1}, {"GPU": 1}], strategy="PACK")
        ray.get(group.ready(), timeout=120)

        @ray.remote(num_cpus=0, num_gpus=0)
        def in_engine(device: str) -> str:
            return engine_device(device)

        devices = []
        for bundle in (0, 1):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle,
                                                        placement_group_capture_child_tasks=True)
            env = {"VLLM_RAY_BUNDLE_INDICES": str(bundle), "VLLM_RAY_PER_WORKER_GPUS": "1"}
            devices.append(ray.get(in_engine.options(scheduling_strategy=strategy,
                                                      runtime_env={"env_vars": env}).remote("auto"), timeout=120))
        assert sorted(devices) == ["cuda:0", "cuda:1"], devices
        # outside a tensor-parallel engine the setting is left as it is
        assert engine_device("auto") == "auto" and engine_device("cpu") == "cpu"
        remove_placement_group(group)
    finally:
        ray.shutdown()
        cluster.remove_node(node)


def test_gpu_actors_get_their_engines_gpus_and_the_flash_switch_only_without_kernels(monkeypatch, tiny_recipe_dict):
    from csr_plugin import accelerator
    from csr_plugin.sampling.ray_actors import _actor_options, actor_recipe, engine_gpus

    recipe = recipe_from_dict(dict(tiny_recipe_dict, search={"engine": "vllm", "vllm": {"tensor_parallel_size": 2}}))
    assert engine_gpus(recipe) == 2 and _actor_options(True, gpus=2)["num_gpus"] == 2
    on_gpu_3 = recipe_from_dict(dict(tiny_recipe_dict, clip={**tiny_recipe_dict["clip"], "device": "cuda:3"}))
    assert actor_recipe(on_gpu_3)["clip"]["device"] == "cuda:0"   # the actor's first GPU: its engine's
    monkeypatch.setattr(accelerator, "flash_attn_kernels", lambda: True)
    assert accelerator.FLASH_TRITON_VAR not in _actor_options(True)["runtime_env"]["env_vars"]
    monkeypatch.setattr(accelerator, "flash_attn_kernels", lambda: False)
    assert _actor_options(True)["runtime_env"]["env_vars"][accelerator.FLASH_TRITON_VAR] == "TRUE"


def test_flash_attention_without_kernels_trains_with_sdpa_and_says_so(monkeypatch, tiny_recipe_dict, caplog):
    from csr_plugin import accelerator
    from csr_plugin.openrlhf.ppo import gpu_attention
    from csr_plugin.training.launch import installed_attention

    monkeypatch.setattr(accelerator, "flash_attn_kernels", lambda: False)
    recipe = recipe_from_dict(dict(tiny_recipe_dict, dpo={"attn_implementation": "flash_attention_2"},
                                   ppo={"attn_implementation": "flash_attention_2"}))
    with caplog.at_level("WARNING", logger="csr_plugin"):
        changed, overrides = installed_attention(recipe, ["dpo.beta=0.2"])
        assert gpu_attention(recipe).ppo.attn_implementation == "sdpa"
    assert changed.dpo.attn_implementation == "sdpa" and overrides == ["dpo.beta=0.2", "dpo.attn_implementation=sdpa"]
    assert sum("needs flash-attn's CUDA kernels" in r.getMessage() for r in caplog.records) == 2
    monkeypatch.setattr(accelerator, "flash_attn_kernels", lambda: True)
    assert installed_attention(recipe, []) == (recipe, [])


def test_vllm_gets_gpu_defaults_from_the_recipe_and_the_model(monkeypatch, tiny_recipe_dict):
    """On a GPU: gpu_memory_utilization = search.vllm_gpu_memory, max_model_len = the model's context;
    search.vllm wins over both; the CPU build keeps its own defaults."""
    pytest.importorskip("vllm")
    from transformers import AutoConfig

    from csr_plugin.model_source import context_length
    from csr_plugin.sampling import vllm_engine
    from csr_plugin.sampling.vllm_engine import CPU_ENGINE_DEFAULTS, VllmEngine, engine_args

    recipe = recipe_from_dict(dict(tiny_recipe_dict, search={"engine": "vllm", "vllm_gpu_memory": 0.55}))
    assert engine_args(recipe.search, cpu=False, max_model_len=512) == {"gpu_memory_utilization": 0.55,
                                                                        "max_model_len": 512}
    assert engine_args(recipe.search, cpu=True, max_model_len=512) == CPU_ENGINE_DEFAULTS
    mine = recipe_from_dict(dict(tiny_recipe_dict, search={"engine": "vllm", "vllm": {"gpu_memory_utilization": 0.5}}))
    assert engine_args(mine.search, cpu=False, max_model_len=512)["gpu_memory_utilization"] == 0.5
    with pytest.raises(ConfigError, match=r"search.vllm_gpu_memory` must be in \(0, 1\)"):
        recipe_from_dict(dict(tiny_recipe_dict, search={"vllm_gpu_memory": 1.0}))

    passed = {}

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):
        passed.update(kwargs)
        raise Stop

    vllm = vllm_engine.import_vllm()
    monkeypatch.setattr(vllm, "LLM", fake_llm)
    monkeypatch.setattr(vllm_engine, "on_cpu", lambda: False)   # as on a GPU
    with pytest.raises(Stop):
        VllmEngine.from_config(recipe.model, recipe.search)
    context = context_length(AutoConfig.from_pretrained(recipe.model.path))
    assert passed["gpu_memory_utilization"] == 0.55 and passed["max_model_len"] == context
    assert "kv_cache_memory_bytes" not in passed and "enforce_eager" not in passed

    from transformers import AutoProcessor

    from csr_plugin.sampling.openrlhf_actors import rollout_actor_kwargs

    kwargs = rollout_actor_kwargs(recipe, True, AutoProcessor.from_pretrained(recipe.model.path))
    assert kwargs["gpu_memory_utilization"] == 0.55 and kwargs["max_model_len"] == context and kwargs["num_gpus"] == 1


def test_the_evaluator_releases_its_model_before_the_next_stage(monkeypatch, tiny_recipe_dict, tmp_path):
    """At the moment evaluate() hands memory back, nothing holds the model any more (the generator's closure
    included), and torch's cache is emptied when CUDA is there (faked: this machine has none)."""
    import torch

    from csr_plugin.eval import evaluate as evaluate_module
    from csr_plugin.eval.objects import ObjectVocabulary
    from csr_plugin.sampling import transformers_engine
    from csr_plugin.sampling.prompts import load_prompts

    prompts, _ = load_prompts(tiny_recipe_dict["data"]["prompts"])
    prompts = prompts[:2]
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"id": p.id, "image": p.image, "question": "Describe the image."}) + "\n" for p in prompts))
    (tmp_path / "truth.jsonl").write_text("".join(json.dumps({"id": p.id, "objects": ["circle"]}) + "\n"
                                                  for p in prompts))
    ObjectVocabulary({"circle": [], "square": [], "star": [], "heart": []}).to_json(tmp_path / "objects.json")
    recipe = recipe_from_dict({**tiny_recipe_dict, "eval": {
        "prompts": str(tmp_path / "prompts.jsonl"), "truth": str(tmp_path / "truth.jsonl"),
        "vocabulary": str(tmp_path / "objects.json"), "max_new_tokens": 4, "pope_per_image": 1}})

    loaded, seen = [], {}
    real_load = transformers_engine.load_vlm

    def load_vlm(model_cfg):
        model, processor = real_load(model_cfg)
        loaded.append(weakref.ref(model))
        return model, processor

    emptied = []
    monkeypatch.setattr(transformers_engine, "load_vlm", load_vlm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(loaded[0]() is None))
    real_release = evaluate_module.release_memory

    def release_memory():
        real_release()   # gc first, then the cache
        seen["model_alive"] = loaded[0]() is not None

    monkeypatch.setattr(evaluate_module, "release_memory", release_memory)
    evaluate_module.evaluate(recipe.model, recipe.eval)
    gc.collect()
    assert seen == {"model_alive": False} and emptied == [True]


def test_the_reward_server_address_comes_from_the_recipe(monkeypatch, tmp_path, tiny_recipe_dict, capsys):
    """Bound to 127.0.0.1 unless the recipe (serve.host) or --host says otherwise; the printed
    --reward.remote_url names a host other nodes can reach when it binds every interface."""
    import socket

    import yaml

    from csr_plugin.cli import main
    from csr_plugin.openrlhf import reward_server
    from csr_plugin.openrlhf.reward_server import remote_url
    from csr_plugin.recipe_commands import show

    assert recipe_from_dict({}).serve.host == "127.0.0.1"
    assert remote_url("127.0.0.1", 5000) == "http://127.0.0.1:5000/get_reward"
    assert remote_url("0.0.0.0", 6000) == f"http://{socket.getfqdn()}:6000/get_reward"
    assert remote_url("0.0.0.0", 6000, "head-node") == "http://head-node:6000/get_reward"
    assert remote_url("::", 1, "fd00::1") == "http://[fd00::1]:1/get_reward"
    with pytest.raises(ConfigError, match="serve.port"):
        recipe_from_dict({"serve": {"port": 70000}})

    bound = []

    class Server:
        host, port = "", 0

    def serve(recipe, host, port, *args, ready=None, **kwargs):
        bound.append((host, port))
        Server.host, Server.port = host, port
        ready(Server)

    monkeypatch.setattr(reward_server, "serve", serve)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(dict(tiny_recipe_dict, serve={"host": "0.0.0.0", "port": 6001,
                                                                 "url_host": "head-node"})))
    assert main(["serve-reward", "--config", str(path)]) == 0
    assert "--reward.remote_url http://head-node:6001/get_reward" in capsys.readouterr().out
    assert main(["serve-reward", "--config", str(path), "--host", "127.0.0.1", "--port", "6002"]) == 0
    assert "this machine only" in capsys.readouterr().out
    assert bound == [("0.0.0.0", 6001), ("127.0.0.1", 6002)]
    recipe = recipe_from_dict(dict(tiny_recipe_dict, serve={"host": "0.0.0.0", "url_host": "head-node"}))
    assert "--reward.remote_url http://head-node:5000/get_reward" in show(recipe, str(path), [])
