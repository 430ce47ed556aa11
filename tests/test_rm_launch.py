"""`csr train-rm` launching (rm.hostfile, rm.master_port) and `rm.openrlhf`: OpenRLHF's own flags reach the
reward model's ranks, unless a named rm key owns the flag or the reward model worker does not act on it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from csr_plugin.config import ConfigError, recipe_from_dict
from csr_plugin.reward_model.launch import worker_command
from csr_plugin.reward_model.train_main import loader_config, rm_flags
from csr_plugin.training.openrlhf_args import as_namespace

MODULE = "csr_plugin.reward_model.train_main"
REPO = Path(__file__).resolve().parent.parent


def _recipe(**rm):
    return recipe_from_dict({"model": {"path": "m"}, "rm": rm})


def _flags(**openrlhf) -> dict:
    return rm_flags(_recipe(openrlhf=openrlhf).rm, "model", "pairs.jsonl", "out", gpu=False)


# -------------------------------------------------------------------------------------------- launching
def test_rm_launch_command_free_port_fixed_port_and_hostfile():
    command = worker_command(_recipe(), "r.yaml", ["rm.epochs=2"], "m", "p.jsonl", "out")
    assert "--standalone" in command and "--nproc_per_node=2" in command
    assert command[command.index("-m", 3) + 1] == MODULE and command[-1] == "rm.epochs=2"
    fixed = worker_command(_recipe(master_port=29999), "r.yaml", [], "m", "p.jsonl", "out")
    assert "--master_port=29999" in fixed and "--standalone" not in fixed
    hosts = worker_command(_recipe(hostfile="hosts"), "r.yaml", [], "m", "p.jsonl", "out")
    # the launcher of this interpreter's environment (found without the venv on PATH)
    assert Path(hosts[0]).name == "deepspeed" and hosts[1:3] == ["--hostfile", "hosts"]
    assert hosts[0] == str(Path(sys.executable).parent / "deepspeed")
    assert hosts[hosts.index("--module") + 1] == MODULE
    assert 1024 <= int(hosts[hosts.index("--master_port") + 1]) <= 65535   # a free port picked here
    both = worker_command(_recipe(hostfile="hosts", master_port=29501), "r.yaml", [], "m", "p.jsonl", "out")
    assert both[both.index("--master_port") + 1] == "29501"


@pytest.mark.parametrize("port", [0, 80, 70000])
def test_rm_master_port_out_of_range_is_refused(port):
    with pytest.raises(ConfigError, match=r"rm.master_port.*\[1024, 65535\]"):
        _recipe(master_port=port)


def test_rm_batch_is_checked_against_nproc_only_without_a_hostfile():
    with pytest.raises(ConfigError, match="rm.batch"):
        _recipe(batch=3, nproc=2)
    assert _recipe(batch=3, nproc=2, hostfile="hosts").rm.batch == 3   # the ranks check their real world


# -------------------------------------------------------------------------------------------- rm.openrlhf
def test_rm_passthrough_reaches_the_namespace_the_ranks_build():
    args = as_namespace(_flags(**{"ds.adam_offload": True, "adam": {"betas": [0.9, 0.99], "eps": "1e-6"},
                                  "lr_scheduler": "constant", "max_norm": 0.5}))
    assert args.ds.adam_offload is True and list(args.adam.betas) == [0.9, 0.99]
    assert args.adam.eps == pytest.approx(1e-6) and isinstance(args.adam.eps, float)
    assert args.lr_scheduler == "constant" and args.max_norm == 0.5
    plain = as_namespace(_flags())
    assert plain.ds.adam_offload is False and tuple(plain.adam.betas) == (0.9, 0.95) and plain.adam.eps == 1e-8
    # the named keys still set theirs
    assert as_namespace(rm_flags(_recipe(lr=3e-4, batch=4).rm, "m", "p", "o")).adam.lr == 3e-4


def test_rm_loader_flags_from_the_passthrough_reach_the_loader():
    args = as_namespace(_flags(**{"ds.attn_implementation": "eager", "ds.lora.dropout": 0.05,
                                  "ds.lora.target_modules": ["q_proj", "v_proj"]}))
    loader = loader_config(_recipe().rm, args)
    assert (loader.attn_implementation, loader.lora_dropout, loader.lora_targets) == ("eager", 0.05,
                                                                                      ["q_proj", "v_proj"])


@pytest.mark.parametrize("flag,value,named", [
    ("adam.lr", 1e-6, "rm.lr"),
    ("train.batch_size", 4, "rm.batch"),
    ("ds.zero_stage", 2, "rm.zero_stage"),
    ("ckpt.save_steps", 5, "rm.ckpt_steps"),
    ("model.gradient_checkpointing_enable", True, "rm.gradient_checkpointing"),
])
def test_rm_flag_a_named_key_sets_is_refused_naming_both(flag, value, named):
    with pytest.raises(ConfigError) as err:
        _flags(**{flag: value})
    assert f"`rm.openrlhf.{flag}`" in str(err.value) and f"`{named}`" in str(err.value)


@pytest.mark.parametrize("flag,value,why", [
    ("model.beta", 0.2, "DPO loss flag"),
    ("model.ipo_enable", True, "DPO loss flag"),
    ("model.nll_loss_coef", 0.1, "DPO loss flag"),
    ("ref.offload", True, "no reference model"),
    ("logger.wandb.project", "p", "rm_metrics.jsonl only"),
    ("ds.tensor_parallel_size", 2, "data parallelism only"),
    ("ds.packing_samples", True, "does not pack"),
    ("eval.dataset", "x.jsonl", "rm.eval_fraction"),
    ("optim", "muon", "runs Adam"),
    ("vllm.num_engines", 2, "not a flag csr's reward model worker reads"),
    ("data.dataset", "x.jsonl", "set by csr itself"),
    ("ds.adam_offload", 1, "switch"),
])
def test_rm_flags_the_worker_does_not_act_on_are_refused_with_the_reason(flag, value, why):
    with pytest.raises(ConfigError, match=why) as err:
        _flags(**{flag: value})
    assert f"rm.openrlhf.{flag}" in str(err.value)


def test_a_refused_rm_flag_fails_before_any_rank_starts(monkeypatch, tmp_path):
    import csr_plugin.reward_model.launch as launch

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(launch, "launch_ranks", lambda *a, **k: pytest.fail("ranks started"))
    recipe = _recipe(openrlhf={"model.beta": 0.2})
    with pytest.raises(ConfigError, match="model.beta"):
        launch.run_rm(recipe, "r.yaml", [], "m", "p.jsonl", str(tmp_path))


# ------------------------------------------------------------------------------- gradient checkpointing
def test_rm_gradient_checkpointing_recomputes_the_layers_with_the_same_gradients(tiny_recipe_dict, tmp_path):
    """load_reward_backbone (the ranks' loader) with rm.gradient_checkpointing: each decoder layer runs again in
    backward (the reward model calls the inner model, which still checkpoints), and the gradients are those
    of a run without it."""
    from test_reward_model import colour_pairs

    from csr_plugin.reward_model.data import RewardPairs, split_rewards
    from csr_plugin.reward_model.losses import bradley_terry_loss
    from csr_plugin.reward_model.model import MultimodalRewardModel, _hf_model
    from csr_plugin.reward_model.train_main import load_reward_backbone
    from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor

    path = tiny_recipe_dict["model"]["path"]
    ds_config = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}
    recipe = _recipe(gradient_checkpointing=True, openrlhf={"ds.attn_implementation": "eager"})
    args = as_namespace(rm_flags(recipe.rm, path, "p", str(tmp_path), gpu=False))
    backbone = load_reward_backbone(path, recipe.rm, args, ds_config, False)
    assert backbone.config.get_text_config()._attn_implementation == "eager"   # the passthrough loaded
    torch.manual_seed(0)
    model = MultimodalRewardModel(backbone, "linear").train()
    layer = next(m for m in _hf_model(backbone).modules() if type(m).__name__.endswith("DecoderLayer"))
    calls = []
    # a pre-hook: recomputation stops as soon as backward has what it needs, before forward hooks would run
    layer.register_forward_pre_hook(lambda *_: calls.append(1))

    dataset = MultimodalPreferenceDataset(str(colour_pairs(tmp_path / "pairs", 2)), load_processor(path), 512)
    pairs = RewardPairs(dataset, [0, 1], backbone.config)
    batch = pairs.collate_fn([pairs[0], pairs[1]])

    def grads():
        model.zero_grad()
        calls.clear()
        bradley_terry_loss(*split_rewards(model(**batch))).backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert backbone.is_gradient_checkpointing
    with_ckpt, grads_ckpt = grads()
    backbone.gradient_checkpointing_disable()
    without, grads_plain = grads()
    assert (with_ckpt, without) == (2, 1), "the layer runs again in backward only with checkpointing"
    assert grads_ckpt.keys() == grads_plain.keys() and any("language_model" in n for n in grads_ckpt)
    for name in grads_plain:
        assert torch.allclose(grads_ckpt[name], grads_plain[name], rtol=0, atol=1e-6), name


@pytest.mark.slow   # two ranks importing DeepSpeed and OpenRLHF: 30-60 s on 2 shared cores
def test_ranks_of_an_outside_launcher_check_rm_batch_against_their_world(tiny_recipe_dict, tmp_path):
    """rm.nproc: 1 passes the recipe check with batch 1, but torchrun here starts 2 ranks: each refuses before
    loading anything, naming the key and the world size."""
    from test_launch import _pairs

    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["output_dir"] = str(tmp_path / "out")
    recipe["rm"] = {"pairs": str(_pairs(tmp_path / "data", 2)), "nproc": 1, "batch": 1, "micro_batch": 1}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "csr_plugin.cli", "-v", "train-rm", "--config", str(tmp_path / "r.yaml")],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0
    assert "`rm.batch` (1) must be a multiple of rm.micro_batch x the ranks (1 x 2)" in done.stdout + done.stderr
    assert not (tmp_path / "out" / "final").exists()
