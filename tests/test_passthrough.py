"""`dpo.openrlhf` / `ppo.openrlhf`: OpenRLHF's own flags from a recipe, checked by the entry point that runs them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from csr_plugin.config import ConfigError, load_recipe
from csr_plugin.openrlhf.cli_args import OpenRLHFArgsError, parse_openrlhf_args
from csr_plugin.openrlhf.ppo import PPO_MODULE, ppo_flags, to_argv
from csr_plugin.passthrough import controlled_flags, flatten
from csr_plugin.recipe_commands import DPO_WORKER, check
from csr_plugin.training.openrlhf_args import _own_dpo_flags, as_namespace, dpo_flags

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY, PPO_RECIPE = RECIPES / "tiny.yaml", RECIPES / "ppo-stepwise.yaml"


def _dpo(*overrides: str) -> dict:
    recipe = load_recipe(TINY, list(overrides))
    return dpo_flags(recipe.dpo, "model", "pairs.jsonl", "out", gpu=False)


def test_dpo_passthrough_reaches_the_namespace_the_worker_builds():
    args = as_namespace(_dpo("dpo.openrlhf.ds.adam_offload=true", "dpo.openrlhf.adam.betas=[0.9, 0.99]",
                             "dpo.openrlhf.ref.offload=true", "dpo.openrlhf.min_lr_ratio=0.2"))
    assert args.ds.adam_offload is True and list(args.adam.betas) == [0.9, 0.99]
    assert args.ref.offload is True and args.min_lr_ratio == 0.2
    # without the passthrough the worker's defaults stand
    plain = as_namespace(_dpo())
    assert plain.ds.adam_offload is False and tuple(plain.adam.betas) == (0.9, 0.95) and plain.min_lr_ratio == 0.1


def test_dotted_and_nested_spellings_and_yaml_exponents_mean_the_same_flag():
    # the command line splits `dpo.openrlhf.adam.eps=1e-6` at every dot; YAML keeps `adam.eps` as one key
    assert flatten({"adam": {"eps": 1}}, "x") == flatten({"adam.eps": 1}, "x") == {"adam.eps": 1}
    flags = _dpo("dpo.openrlhf.adam.eps=1e-6")      # YAML 1.1 reads 1e-6 as a string
    assert flags["adam.eps"] == pytest.approx(1e-6) and isinstance(flags["adam.eps"], float)
    with pytest.raises(ConfigError, match="twice"):
        flatten({"adam": {"eps": 1}, "adam.eps": 2}, "dpo.openrlhf")


@pytest.mark.parametrize("override,named", [
    ("dpo.openrlhf.adam.lr=1e-6", "dpo.lr"),
    ("dpo.openrlhf.train.batch_size=4", "dpo.batch"),
    ("dpo.openrlhf.ds.lora.rank=8", "dpo.lora_rank"),
    ("dpo.openrlhf.model.ipo_enable=true", "dpo.loss"),
])
def test_a_flag_a_named_key_sets_is_refused_naming_both(override, named):
    flag = override.split("=")[0].removeprefix("dpo.openrlhf.")
    with pytest.raises(ConfigError) as err:
        _dpo(override)
    assert f"dpo.openrlhf.{flag}" in str(err.value) and f"`{named}`" in str(err.value)


def test_which_named_key_sets_which_flag_is_found_from_the_builder():
    recipe = load_recipe(TINY, [])
    owners = controlled_flags(lambda s: _own_dpo_flags(s["dpo"], "m", "p", "o", False, None), {"dpo": recipe.dpo})
    # read off dpo_flags: each named key and the OpenRLHF flag(s) it writes
    assert owners["adam.lr"] == "dpo.lr" and owners["lr_warmup_ratio"] == "dpo.warmup_ratio"
    assert owners["train.micro_batch_size"] == "dpo.micro_batch" and owners["ckpt.save_steps"] == "dpo.ckpt_steps"
    assert owners["ds.param_dtype"] == "dpo.dtype"
    # flags no named key writes are free for the passthrough
    assert not {"ds.adam_offload", "adam.betas", "min_lr_ratio", "ref.offload"} & owners.keys()


@pytest.mark.parametrize("override,why", [
    ("dpo.openrlhf.ds.packing_samples=true", "does not act on"),   # our collate pads, it does not pack
    ("dpo.openrlhf.eval.dataset=x.jsonl", "does not act on"),
    ("dpo.openrlhf.vllm.num_engines=2", "not a flag csr's DPO worker reads"),
    ("dpo.openrlhf.logger.wandb.key=k", "logging: section"),
    ("dpo.openrlhf.data.dataset=x.jsonl", "set by csr itself"),
    ("dpo.openrlhf.ds.adam_offload=1", "switch"),
])
def test_dpo_flags_the_worker_would_ignore_or_sets_itself_are_refused(override, why):
    with pytest.raises(ConfigError, match=why):
        _dpo(override)


def test_ppo_passthrough_reaches_train_ppo_ray_namespace():
    recipe = load_recipe(PPO_RECIPE, ["ppo.openrlhf.ref.offload=true", "ppo.openrlhf.actor.policy_loss_type=gspo",
                                      "ppo.openrlhf.vllm.sync_backend=gloo"])
    args = parse_openrlhf_args(PPO_MODULE, to_argv(ppo_flags(recipe, "prompts.jsonl")))
    assert args.ref.offload is True and args.actor.policy_loss_type == "gspo" and args.vllm.sync_backend == "gloo"


def test_ppo_passthrough_conflicts_and_unknown_flags_are_refused():
    recipe = load_recipe(PPO_RECIPE, ["ppo.openrlhf.rollout.temperature=0.5"])
    with pytest.raises(ConfigError, match="`search.temperature`"):
        ppo_flags(recipe, "prompts.jsonl")
    recipe = load_recipe(PPO_RECIPE, ["ppo.openrlhf.actor.no_such_flag=1"])
    with pytest.raises(OpenRLHFArgsError, match="no_such_flag"):   # train_ppo_ray's own parser says no
        check(recipe, str(PPO_RECIPE), [])


def test_a_dpo_only_recipe_checks_without_vllm():
    # a fresh interpreter where `import vllm` fails, as on a machine without it (this process may have
    # imported vLLM's modules already, which would hide the failure)
    script = f"""
import sys
sys.modules["vllm"] = None
from csr_plugin.config import load_recipe
from csr_plugin.openrlhf.cli_args import OpenRLHFArgsError
from csr_plugin.recipe_commands import check
print(check(load_recipe({str(TINY)!r}), {str(TINY)!r}, []))
try:
    check(load_recipe({str(PPO_RECIPE)!r}), {str(PPO_RECIPE)!r}, [])
except OpenRLHFArgsError as exc:
    print("PPO refused:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == repr([DPO_WORKER])
    assert lines[-1].startswith("PPO refused:") and "vllm" in lines[-1]


def test_the_docs_table_of_named_keys_is_the_one_the_code_finds():
    from csr_plugin.recipe_commands import named_flags_markdown

    text = (Path(__file__).resolve().parents[1] / "docs" / "openrlhf-flags.md").read_text()
    begin, end = "<!-- generated by `csr recipe flags`: begin -->\n", "<!-- generated by `csr recipe flags`: end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == named_flags_markdown()


def test_recipe_check_covers_rm_openrlhf_where_the_recipe_has_an_rm_section(tmp_path):
    from csr_plugin.recipe_commands import RM_WORKER

    recipe = load_recipe(TINY, ["rm.openrlhf.adam.eps=1e-6"])
    assert check(recipe, str(TINY), ["rm.openrlhf.adam.eps=1e-6"]) == [DPO_WORKER, RM_WORKER]
    # a flag the reward-model loop does not act on fails the check, before any rank would start
    refused = load_recipe(TINY, ["rm.openrlhf.model.beta=0.2"])
    with pytest.raises(ConfigError, match=r"rm\.openrlhf.*model\.beta"):
        check(refused, str(TINY), ["rm.openrlhf.model.beta=0.2"])
    # without an rm: section nor an rm. override the reward-model worker is not checked
    assert check(load_recipe(TINY, []), str(TINY), []) == [DPO_WORKER]
