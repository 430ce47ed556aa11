"""`dpo.sft_data`: supervised examples mixed into DPO, their NLL in OpenRLHF's nll_loss slot (with the chosen
responses' NLL when `dpo.nll_loss_coef` is set too)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from csr_plugin.config import ConfigError, recipe_from_dict
from csr_plugin.training.launch import preflight
from csr_plugin.training.openrlhf_args import dpo_flags

REPO = Path(__file__).resolve().parent.parent
ANSWER = "A green square."


def _message(role: str, text: str, image: bool = False) -> list[dict]:
    return [{"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 pairs preferring "A red circle." and 8 SFT examples answering ANSWER (images given relative)."""
    folder = tmp_path_factory.mktemp("sft_mix")
    (folder / "img").mkdir()
    pairs, sft = [], []
    for i in range(8):
        Image.new("RGB", (32, 32), (200, 30 + i, 30)).save(folder / "img" / f"{i}.png")
        prompt = _message("user", "Describe.", image=True)
        pairs.append({"images": [str(folder / "img" / f"{i}.png")], "prompt": prompt,
                      "chosen": _message("assistant", "A red circle."),
                      "rejected": _message("assistant", "A blue star.")})
        sft.append({"images": [f"img/{i}.png"], "prompt": prompt, "response": _message("assistant", ANSWER)})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (folder / "sft.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sft) + "{broken\n")
    return folder


def _recipe(tiny_recipe_dict, **dpo) -> dict:
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["dpo"] = dpo
    return recipe


def test_sft_data_checked_before_anything_runs_and_its_weight_in_openrlhfs_slot(tiny_recipe_dict, data):
    with pytest.raises(ConfigError, match="sft_coef"):
        recipe_from_dict(_recipe(tiny_recipe_dict, sft_data=str(data / "sft.jsonl"), sft_coef=0.0))
    with pytest.raises(ConfigError, match=r"dpo.sft_data`: no file at .*missing.jsonl"):
        preflight(recipe_from_dict(_recipe(tiny_recipe_dict, sft_data=str(data / "missing.jsonl"))))
    recipe = recipe_from_dict(_recipe(tiny_recipe_dict, sft_data=str(data / "sft.jsonl"), sft_coef=0.5))
    preflight(recipe)
    assert dpo_flags(recipe.dpo, "m", "p", "o")["model.nll_loss_coef"] == 0.5   # OpenRLHF's loop weighs it
    both = recipe_from_dict(_recipe(tiny_recipe_dict, sft_data=str(data / "sft.jsonl"), sft_coef=0.5,
                                    nll_loss_coef=2.0))
    assert dpo_flags(both.dpo, "m", "p", "o")["model.nll_loss_coef"] == 1.0   # the trainer weighs both


def test_sft_and_chosen_nll_weighted_together_only_when_both_are_on():
    from csr_plugin.training.trainer import MultimodalDPOTrainer

    trainer = MultimodalDPOTrainer.__new__(MultimodalDPOTrainer)   # mixed_nll reads its two weights only
    chosen, sft = torch.tensor(0.8), torch.tensor(0.3)
    trainer.sft_coef, trainer.chosen_nll_coef = 0.5, 2.0
    assert trainer.mixed_nll(chosen, sft).item() == pytest.approx(0.5 * 0.3 + 2.0 * 0.8)
    trainer.chosen_nll_coef = 0.0   # SFT alone: its NLL unweighted, OpenRLHF applies sft_coef
    assert trainer.mixed_nll(chosen, sft).item() == pytest.approx(0.3)


def test_sft_examples_read_with_relative_images_and_a_bad_line_skipped(tiny_recipe_dict, data):
    from csr_plugin.training.data import load_processor
    from csr_plugin.training.sft_mix import SFTDataset

    processor = load_processor(tiny_recipe_dict["model"]["path"])
    dataset = SFTDataset(str(data / "sft.jsonl"), processor, 512)
    assert len(dataset) == 8 and dataset.skipped and dataset.skipped[0].startswith("line 9:")
    item = dataset[3]
    tokenizer = processor.tokenizer
    assert tokenizer.decode(item["response_ids"], skip_special_tokens=True).strip() == ANSWER
    assert item["response_ids"][-1] == dataset.end_ids[0]     # trained to stop after the answer
    ids, mask, prompts = dataset.collate_fn([dataset[0], dataset[1]])
    assert ids.shape[0] == 2 and mask.sum(1).tolist() == [len(item["prompt_ids"]) + len(item["response_ids"])] * 2
    assert prompts.image_inputs["pixel_values"].shape[0] == 2


def test_stream_is_a_function_of_the_step_and_ranks_take_disjoint_examples():
    from csr_plugin.training.sft_mix import SFTStream

    dataset = list(range(10))
    ranks = [SFTStream(dataset, 2, rank, 2, seed=7) for rank in (0, 1)]
    first = [set(r.indices(0)) for r in ranks]
    assert not first[0] & first[1]
    # steps 0 and 1 together give 8 distinct examples of 10: the order is a permutation, cycled
    assert len({i for r in ranks for step in (0, 1) for i in r.indices(step)}) == 8
    resumed = SFTStream(dataset, 2, 1, 2, seed=7)
    assert resumed.indices(3) == ranks[1].indices(3) and resumed.order == ranks[1].order


def test_sft_nll_is_the_policy_loss_on_the_answer_tokens(tiny_recipe_dict, data):
    """The trainer's SFT term equals transformers' own loss with labels on the answer tokens only."""
    from csr_plugin.config import DPOConfig
    from csr_plugin.training.data import load_processor
    from csr_plugin.training.device import _install_cpu_safe_helpers
    from csr_plugin.training.dpo_main import load_actor
    from csr_plugin.training.sft_mix import SFTDataset, SFTStream
    from csr_plugin.training.trainer import MultimodalDPOTrainer

    path = tiny_recipe_dict["model"]["path"]
    processor = load_processor(path)
    dataset = SFTDataset(str(data / "sft.jsonl"), processor, 512)
    _install_cpu_safe_helpers()
    policy = load_actor(path, DPOConfig(), {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}},
                        trainable=False).eval()
    trainer = object.__new__(MultimodalDPOTrainer)
    trainer.sft = SFTStream(dataset, 1, 0, 1, seed=0)
    item = dataset[trainer.sft.indices(0)[0]]
    with torch.no_grad():
        nll = trainer.sft_nll(policy)
        ids = torch.tensor([item["prompt_ids"] + item["response_ids"]])
        labels = ids.clone()
        labels[0, :len(item["prompt_ids"])] = -100
        expected = policy.model(input_ids=ids, labels=labels, **item["image_inputs"]).loss
    assert trainer.sft.step == 1
    assert nll.item() == pytest.approx(expected.item(), rel=1e-4)


def _answer_logp(model_path: str, data: Path) -> float:
    from transformers import AutoModelForImageTextToText

    from csr_plugin.training.data import load_processor
    from csr_plugin.training.sft_mix import SFTDataset

    dataset = SFTDataset(str(data / "sft.jsonl"), load_processor(model_path), 512)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
    item = dataset[0]
    ids = torch.tensor([item["prompt_ids"] + item["response_ids"]])
    labels = ids.clone()
    labels[0, :len(item["prompt_ids"])] = -100
    with torch.no_grad():
        return -model(input_ids=ids, labels=labels, **item["image_inputs"]).loss.item() * len(item["response_ids"])


def test_two_rank_zero3_dpo_with_sft_data_learns_the_sft_answer(tmp_path, tiny_recipe_dict, data):
    """The same pairs with and without SFT examples: only the mixed run raises log p(ANSWER) by nats."""
    gains = {}
    base = _answer_logp(tiny_recipe_dict["model"]["path"], data)
    for name, extra in (("plain", {}), ("mixed", {"sft_data": str(data / "sft.jsonl")})):
        recipe = _recipe(tiny_recipe_dict, pairs=str(data / "pairs.jsonl"), nproc=2, zero_stage=3, batch=4,
                         micro_batch=1, epochs=2, lr=1.0e-3, warmup_ratio=0.0, ckpt_steps=0, **extra)
        recipe["output_dir"] = str(tmp_path / name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        result = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "train-dpo", "--config",
                                 str(tmp_path / f"{name}.yaml")], cwd=REPO, capture_output=True, text=True, timeout=900)
        log = tmp_path / name / "logs" / "dpo.log"
        assert result.returncode == 0, result.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
        rows = [json.loads(line) for line in (tmp_path / name / "dpo_metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(("nll_loss" in row) == (name == "mixed") for row in rows)
        gains[name] = _answer_logp(str(tmp_path / name / "final"), data) - base
    assert gains["mixed"] > gains["plain"] + 2.0, gains
