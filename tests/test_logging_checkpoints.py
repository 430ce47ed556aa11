"""The `logging:` section (wandb offline, TensorBoard) and what a DPO run saves: HF checkpoints every N
steps, ds_ckpt/ kept on request, a LoRA adapter kept unmerged on request."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from csr_plugin.config import ConfigError, recipe_from_dict
from csr_plugin.openrlhf.cli_args import parse_openrlhf_args
from csr_plugin.openrlhf.ppo import PPO_MODULE, ppo_flags, to_argv
from csr_plugin.training.launch import preflight
from csr_plugin.training.openrlhf_args import dpo_flags

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """8 pairs that all prefer the same answer: a few steps at lr 1e-3 move the weights."""
    folder = tmp_path_factory.mktemp("pairs")
    lines = []
    for i in range(8):
        Image.new("RGB", (32, 32), (200, 30 + i, 30)).save(folder / f"{i}.png")
        user = [{"type": "image"}, {"type": "text", "text": "Describe."}]
        lines.append({"id": f"p{i}", "images": [str(folder / f"{i}.png")], "prompt": [{"role": "user", "content": user}],
                      "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}],
                      "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A blue star."}]}]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "pairs.jsonl"


def _train(tmp_path, tiny_recipe_dict, pairs, dpo: dict, logging: dict | None = None) -> Path:
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["output_dir"] = str(tmp_path / "dpo")
    recipe["dpo"] = {"pairs": str(pairs), "nproc": 2, "zero_stage": 3, "batch": 4, "micro_batch": 1, "epochs": 1,
                     "lr": 1.0e-3, "warmup_ratio": 0.0, "ckpt_steps": 0, **dpo}
    if logging:
        recipe["logging"] = logging
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "train-dpo", "--config", str(tmp_path / "r.yaml")],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    logs = tmp_path / "dpo" / "logs" / "dpo.log"
    assert result.returncode == 0, result.stderr[-3000:] + (logs.read_text()[-3000:] if logs.exists() else "")
    return tmp_path / "dpo"


def _weights(path) -> dict:
    from transformers import AutoModelForImageTextToText

    return dict(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).named_parameters())


def test_logging_is_off_by_default_and_its_flags_pass_openrlhf_parsers(tiny_recipe_dict):
    recipe = recipe_from_dict({**tiny_recipe_dict, "output_dir": "runs/exp"})
    off = dpo_flags(recipe.dpo, "m", "p.jsonl", "runs/exp")
    assert off["logger.wandb.key"] is None and off["logger.tensorboard_dir"] is None   # OpenRLHF: both off
    assert ppo_flags(recipe, "p.jsonl")["logger.tensorboard_dir"] is None

    on = recipe_from_dict({**tiny_recipe_dict, "output_dir": "runs/exp",
                           "logging": {"wandb": True, "wandb_project": "proj", "tensorboard": True, "steps": 5}})
    args = parse_openrlhf_args("openrlhf.cli.train_dpo",
                               to_argv(dpo_flags(on.dpo, "m", "p.jsonl", "runs/exp/iter_2/dpo", gpu=True,
                                                 logging=on.logging)))   # OpenRLHF's CLI has no fp32
    assert args.logger.wandb.key == "offline" and args.logger.wandb.project == "proj"
    assert args.logger.wandb.run_name == "exp-iter_2"   # iterations of one `csr run` stay apart
    assert args.logger.tensorboard_dir == "runs/exp/iter_2/dpo/tensorboard" and args.logger.logging_steps == 5
    args = parse_openrlhf_args(PPO_MODULE, to_argv(ppo_flags(on, "p.jsonl")))
    assert args.logger.wandb.key == "offline" and args.logger.wandb.run_name == "exp"
    assert args.logger.tensorboard_dir == "runs/exp/ppo/tensorboard" and args.logger.logging_steps == 5
    # PPO's trainer runs in a Ray actor: offline mode must reach it through the job's runtime_env
    from csr_plugin.openrlhf.ppo import runtime_env

    assert runtime_env(on)["env_vars"]["WANDB_MODE"] == "offline"
    assert "WANDB_MODE" not in runtime_env(recipe)["env_vars"]


def test_preflight_names_the_key_and_the_fix(tiny_recipe_dict, tmp_path, monkeypatch):
    lora_kept = recipe_from_dict({**tiny_recipe_dict, "dpo": {"lora_rank": 8, "lora_merge": False}})
    preflight(lora_kept)   # `csr train-dpo` may keep the adapter ...
    with pytest.raises(ConfigError, match=r"dpo.lora_merge: true"):
        preflight(lora_kept, loop=True)   # ... `csr run` needs a whole model per iterate
    with pytest.raises(ConfigError, match=r"dpo.lora_rank"):
        recipe_from_dict({**tiny_recipe_dict, "dpo": {"lora_merge": False}})   # nothing to keep

    online = recipe_from_dict({**tiny_recipe_dict, "logging": {"wandb": True, "wandb_mode": "online"}})
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))   # no ~/.netrc: wandb has no key
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match="wandb login"):
        preflight(online)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    preflight(online)


@pytest.mark.slow
def test_wandb_offline_tensorboard_hf_checkpoints_and_kept_ds_ckpt(tmp_path, tiny_recipe_dict, pairs):
    """8 pairs, batch 4: 2 optimizer steps, an HF checkpoint after each, logged to wandb (offline) and
    TensorBoard at once (OpenRLHF's DPOTrainer alone writes only one of them)."""
    out = _train(tmp_path, tiny_recipe_dict, pairs, {"hf_ckpt_steps": 1, "keep_ds_ckpt": True},
                 {"wandb": True, "wandb_mode": "offline", "tensorboard": True})
    rows = [json.loads(line) for line in (out / "dpo_metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2]

    # TensorBoard: <out>/tensorboard/<run name = the output folder's name>/, the same numbers as the metrics file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "dpo"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss_mean")]
    assert logged == [(r["global_step"], pytest.approx(r["loss_mean"], rel=1e-6)) for r in rows]

    # wandb, offline: its run file under the run's folder, holding the logged metrics
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    assert b"train/loss_mean" in run_files[0].read_bytes()

    # HF checkpoints per step: whole, loadable, trained, and the last one is the final model
    base = _weights(tiny_recipe_dict["model"]["path"])
    steps = [_weights(out / "hf_ckpt" / f"global_step{n}") for n in (1, 2)]
    assert all((out / "hf_ckpt" / f"global_step{n}" / ".complete").exists() for n in (1, 2))
    for a, b in ((steps[0], base), (steps[1], steps[0])):
        assert any(not torch.equal(a[name], b[name]) for name in a if "language_model" in name)
    final = _weights(out / "final")
    differ = {name: float((final[name] - steps[1][name]).abs().max()) for name in final
              if not torch.equal(final[name], steps[1][name])}
    assert not differ, f"final/ is not hf_ckpt/global_step2 in {len(differ)} tensors (max abs diff): {differ}"

    # dpo.keep_ds_ckpt: the resumable checkpoint stays, with the last step saved at the end (ckpt_steps 0)
    assert (out / "ds_ckpt" / "latest").read_text().strip() == "global_step2"
    assert (out / "ds_ckpt" / "global_step2").is_dir()


@pytest.mark.slow
def test_lora_adapter_kept_unmerged_reloads_with_peft_like_the_merged_model(tmp_path, tiny_recipe_dict, pairs):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from csr_plugin.training.checkpoints import merge_lora

    out = _train(tmp_path, tiny_recipe_dict, pairs, {"lora_rank": 8, "lora_alpha": 16, "lora_merge": False})
    final = out / "final"
    assert (final / "adapter_config.json").exists() and (final / ".complete").exists()
    assert not list(final.glob("model*.safetensors")), "lora_merge: false writes the adapter, not the weights"
    assert not (out / "ds_ckpt").exists(), "ds_ckpt is removed by default"

    base_path = tiny_recipe_dict["model"]["path"]
    processor = AutoProcessor.from_pretrained(final)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "Describe."}]}], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), text=text + " A red circle.",
                       return_tensors="pt")
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    adapted = PeftModel.from_pretrained(base, str(final)).eval()
    # LoRA's B starts at zero: a non-zero B is the trained adapter, loaded
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)
    merged = merge_lora(base_path, final).eval()   # what dpo.lora_merge: true saves
    with torch.no_grad():
        adapter_logits, merged_logits = adapted(**inputs).logits, merged(**inputs).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}   # the base checkpoint's own dtype


def test_reference_and_tdpo_kl_come_from_the_joint_forward_of_the_same_batch(tiny_recipe_dict, pairs):
    """OpenRLHF's loop asks for the policy, then the reference, then the loss: the reference answer and
    TDPO's KL must be those of the joint forward of that very batch, never of another."""
    from csr_plugin.config import DPOConfig
    from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor
    from csr_plugin.training.device import _install_cpu_safe_helpers
    from csr_plugin.training.dpo_main import _mirror_tokenizer_fields, load_actor
    from csr_plugin.training.trainer import MultimodalDPOTrainer

    path = tiny_recipe_dict["model"]["path"]
    processor = load_processor(path)
    _mirror_tokenizer_fields(processor)
    dataset = MultimodalPreferenceDataset(str(pairs), processor, 512)
    batch, other = dataset.collate_fn([dataset[0], dataset[1]]), dataset.collate_fn([dataset[2], dataset[3]])
    _install_cpu_safe_helpers()
    ds_config = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}
    policy, reference = (load_actor(path, DPOConfig(), ds_config, trainable=False).eval() for _ in range(2))
    trainer = object.__new__(MultimodalDPOTrainer)   # the forward and the loss only: no strategy or loop
    trainer.tokenizer, trainer.model, trainer.ref_model = processor, policy, reference
    trainer.loss_name, trainer.beta, trainer.alpha, trainer.kl_chunk = "tdpo2", 0.1, 0.5, 256
    trainer._joint, trainer._margins, trainer.loss_fn = None, [], trainer._tdpo_loss
    with torch.no_grad():
        chosen, rejected, _, _ = trainer.concatenated_forward(policy, *batch)
        ref_chosen, ref_rejected, _, _ = trainer.concatenated_forward(reference, *batch)
        assert ref_chosen is trainer._joint.ref_chosen_logps   # served from the joint call, not run again
        # the same weights in both models: no margin and no KL, so TDPO's loss is -log sigmoid(0) = log 2
        loss, _, _ = trainer.loss_fn(chosen, rejected, ref_chosen, ref_rejected)
        assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
        # another batch's reference is computed, not served from this batch's result
        alone_chosen, _, _, _ = trainer.concatenated_forward(reference, *other)
        assert alone_chosen is not trainer._joint.ref_chosen_logps
        assert torch.allclose(alone_chosen, trainer.concatenated_forward(policy, *other)[0], atol=1e-5)
        with pytest.raises(RuntimeError, match="KL of the policy forward"):
            trainer.loss_fn(chosen.clone(), rejected, ref_chosen, ref_rejected)
