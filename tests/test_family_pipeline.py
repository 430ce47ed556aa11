"""Every VLM family through DPO and evaluation with batches of 2 that differ in prompt length and tiles.

The log-prob check runs the trainer's own forward (OpenRLHF's Actor inside
MultimodalDPOTrainer.concatenated_forward) on a collated micro-batch and compares each
row with a plain, unpadded forward of that one sequence: padding, tile padding and the
per-token tensors (Qwen's mm_token_type_ids and M-RoPE positions, Gemma3's
token_type_ids) must not change a single log-prob.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from csr_plugin.config import ModelConfig
from csr_plugin.multimodal import model_control_token_ids
from csr_plugin.toy.tiny_families import FAMILIES, build_tiny_family
from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor

# Two prompts of different lengths on images of different shapes: 48x48 and 96x48 give
# different tile counts (LLaVA-NeXT, Idefics3, SmolVLM) and image token counts (Qwen).
QUESTIONS = ("Describe the image.", "What shapes and colours do you see in this picture?")
SIZES = ((48, 48), (96, 48))


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _family(root: Path, family: str) -> Path:
    path = root / family
    if not (path / "config.json").exists():
        build_tiny_family(family, path)
    return path


def _messages(role, text):
    image = [{"type": "image"}] if role == "user" else []
    return [{"role": role, "content": image + [{"type": "text", "text": text}]}]


def _write_pairs(folder: Path, tokenizer) -> Path:
    """Pair 0 carries sampled ids (token-exact path), pair 1 text only (tokenized with its prompt)."""
    lines = []
    for i, (question, size) in enumerate(zip(QUESTIONS, SIZES)):
        image = folder / f"img{i}.png"
        Image.new("RGB", size, (40 + 100 * i, 120, 200)).save(image)
        chosen, rejected = "There is a red circle.", "A blue square and a green triangle are here."
        record = {"id": f"p{i}", "images": [str(image)], "prompt": _messages("user", question),
                  "chosen": _messages("assistant", chosen), "rejected": _messages("assistant", rejected)}
        if i == 0:
            record["chosen_token_ids"] = tokenizer(" " + chosen, add_special_tokens=False)["input_ids"]
            record["rejected_token_ids"] = tokenizer(" " + rejected, add_special_tokens=False)["input_ids"]
            record["chosen_finish"], record["rejected_finish"] = "eos", "max_sentences"
        lines.append(json.dumps(record))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plain_logp(model, processor, record_image, prompt_text, prompt_ids, response_ids,
                add_special_tokens=True) -> torch.Tensor:
    """log p of every token after the first, from one unpadded forward, per-token tensors extended by hand."""
    inputs = processor(images=Image.open(record_image).convert("RGB"), text=prompt_text, return_tensors="pt",
                       add_special_tokens=add_special_tokens)
    assert inputs["input_ids"][0].tolist() == prompt_ids
    ids = torch.tensor([prompt_ids + response_ids])
    extra = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key in ("token_type_ids", "mm_token_type_ids"):   # the response is text: type 0
            value = torch.cat([value, value.new_zeros((1, len(response_ids)))], dim=1)
        extra[key] = value
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_logprobs_equal_plain_forwards_in_a_micro_batch_of_two(family, family_root, tmp_path):
    from csr_plugin.config import DPOConfig
    from csr_plugin.training.device import _install_cpu_safe_helpers
    from csr_plugin.training.dpo_main import _mirror_tokenizer_fields, load_actor
    from csr_plugin.training.trainer import MultimodalDPOTrainer

    path = _family(family_root, family)
    processor = load_processor(str(path))
    _mirror_tokenizer_fields(processor)
    pairs = _write_pairs(tmp_path, processor.tokenizer)
    dataset = MultimodalPreferenceDataset(str(pairs), processor, 512)
    assert len(dataset) == 2 and not dataset.skipped
    items = [dataset[0], dataset[1]]
    assert len(items[0]["prompt_ids"]) != len(items[1]["prompt_ids"])
    batch = dataset.collate_fn(items)

    _install_cpu_safe_helpers()   # what make_strategy does in a real run: log-probs without CUDA kernels
    ds_config = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}
    actor = load_actor(str(path), DPOConfig(), ds_config, trainable=False).eval()
    trainer = object.__new__(MultimodalDPOTrainer)   # the forward only: no strategy, optimizer or loop
    trainer.tokenizer, trainer.model, trainer.ref_model, trainer.loss_name = processor, actor, actor, "dpo"
    with torch.no_grad():
        # the joint call training makes (policy and reference: here one model, so both must agree) ...
        joint = trainer.policy_and_reference_forward(*batch)
        chosen_logps, rejected_logps = joint.chosen_logps, joint.rejected_logps
        assert torch.equal(joint.ref_chosen_logps, chosen_logps)
        assert torch.equal(joint.ref_rejected_logps, rejected_logps)
        # ... and a reference forward alone, the answer to a reference request without its policy request
        trainer._joint = None
        alone = trainer.concatenated_forward(actor, *batch)
        assert torch.allclose(alone[0], chosen_logps) and torch.allclose(alone[1], rejected_logps)

        # Every position, the prompt's included: Gemma3's bidirectional image block barely moves the
        # response of a random tiny model (~1e-4) but moves the image positions themselves by ~0.1.
        input_ids, mask, _, image_inputs = trainer.forward_inputs(actor, *batch)
        per_token = actor(input_ids, attention_mask=mask, return_logprobs=True, **image_inputs)

    model = actor.model
    record_images = [tmp_path / "img0.png", tmp_path / "img1.png"]
    for row, item in enumerate(items):
        prompt_text = dataset._prompt_text(dataset._record(row))
        for side, (key, got) in enumerate((("chosen_ids", chosen_logps[row]), ("rejected_ids", rejected_logps[row]))):
            expected = _plain_logp(model, processor, record_images[row], prompt_text, item["prompt_ids"], item[key])
            response = expected[len(item["prompt_ids"]) - 1:]
            assert got.item() == pytest.approx(response.sum().item(), abs=1e-4), (family, row, key)
            batch_row = per_token[side * len(items) + row, :len(expected)]
            assert torch.allclose(batch_row, expected, atol=1e-4), (family, row, key)


# ---------------------------------------------------------------- the whole chain, per family
# Three families cover the input layouts the others share: llava (SentencePiece tokenizer, fixed
# image tokens), qwen2_vl (M-RoPE, image token counts that follow the image size; here a bf16
# checkpoint trained with LoRA, so the merge's dtype is checked too) and smolvlm (tiles padded per
# batch, one image list per text in evaluation). All seven families get the micro-batch log-prob
# check above, the reward scorer check below and the batched generation check in
# test_eval_metrics.py; the whole chain costs 30-75 s a family on this 2-core machine.
CHAIN = {"llava": {}, "llava_next": {}, "qwen2_vl": {"lora_rank": 8, "lora_alpha": 16}, "qwen2_5_vl": {},
         "gemma3": {}, "idefics3": {}, "smolvlm": {}}


def _chain_world(folder: Path) -> dict:
    """6 prompts on images of two shapes, their objects and a vocabulary, for sampling and evaluation."""
    import random

    from csr_plugin.toy.quickstart import QUESTIONS, draw_shapes

    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    prompts, truth = [], []
    for i in range(6):
        image = folder / "images" / f"{i}.png"
        draw_shapes(image, rng, size=48)
        if i % 2:   # 96x48: other tile and image-token counts than 48x48
            Image.open(image).resize((96, 48)).save(image)
        prompts.append({"id": f"c{i}", "image": str(image), "question": QUESTIONS[i % len(QUESTIONS)]})
        truth.append({"id": f"c{i}", "objects": ["circle"] if i % 3 else ["square", "triangle"]})
    for name, rows in (("prompts.jsonl", prompts), ("truth.jsonl", truth)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "objects.json").write_text(json.dumps({"objects": {"circle": ["circles"], "square": ["squares"],
                                                                 "triangle": ["triangles"]}}))
    return {"prompts": str(folder / "prompts.jsonl"), "truth": str(folder / "truth.jsonl"),
            "vocabulary": str(folder / "objects.json")}


@pytest.mark.parametrize("family", list(CHAIN))
def test_sample_curate_train_dpo_eval_chain(family, family_root, tmp_path, tiny_recipe_dict):
    import subprocess
    import sys

    import yaml
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from csr_plugin.cli import main

    path = _family(family_root, family)
    if family == "qwen2_5_vl":   # a community-style tokenizer: its vision tokens are not flagged special
        from test_control_tokens import unflag_vision_tokens

        shutil.copytree(path, tmp_path / "unflagged")
        path = tmp_path / "unflagged"
        unflag_vision_tokens(path)
    if CHAIN[family]:   # a bf16 checkpoint: the LoRA merge must come back in bf16, not fp32
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
        path = tmp_path / "base"
        model.save_pretrained(path)
        AutoProcessor.from_pretrained(family_root / family).save_pretrained(path)
    world = _chain_world(tmp_path / "world")
    out = tmp_path / "run"
    recipe = {
        "model": {"path": str(path), "dtype": "float32", "device": "cpu"},
        "clip": tiny_recipe_dict["clip"], "data": {"prompts": world["prompts"]}, "output_dir": str(out),
        "search": {"beam_width": 3, "candidates": 3, "keep_top": 1, "keep_bottom": 2, "max_sentences": 2,
                   "max_new_tokens": 8, "batch_prompts": 6},
        "dpo": {"pairs": str(out / "pairs.jsonl"), "nproc": 2, "zero_stage": 3, "batch": 4, "micro_batch": 2,
                "epochs": 1, "lr": 1.0e-3, "warmup_ratio": 0.0, "ckpt_steps": 0, **CHAIN[family]},
        "eval": {**world, "batch": 2, "max_new_tokens": 8, "pope_per_image": 1},
    }
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(recipe))

    assert main(["sample", "--config", str(config), "--quiet"]) == 0
    assert main(["curate", "--trees", str(out / "trees.jsonl"), "--out", str(out / "pairs.jsonl"),
                 "--config", str(config)]) == 0
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 4 and all(p["chosen_token_ids"] and p["rejected_token_ids"] for p in pairs)
    control = model_control_token_ids(ModelConfig(path=str(path)))
    sampled = {t for line in (out / "trees.jsonl").read_text().splitlines()
               for node in json.loads(line)["nodes"] for t in node["token_ids"]}
    assert control and not sampled & control

    result = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "train-dpo", "--config", str(config)],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "dpo_metrics.jsonl").read_text().splitlines()]
    assert rows and rows[0]["loss_mean"] == pytest.approx(0.6931, abs=1e-3)   # policy == reference: log 2

    final = out / "final"
    trained = AutoModelForImageTextToText.from_pretrained(final)
    before = AutoModelForImageTextToText.from_pretrained(path)
    expected_dtype = torch.bfloat16 if CHAIN[family] else torch.float32
    assert {p.dtype for p in trained.parameters()} == {expected_dtype}
    # one optimizer step (no warm-up, whose first step has lr 0) moved the weights
    assert any(not torch.equal(a, b.to(a.dtype)) for a, b in zip(trained.parameters(), before.parameters()))
    processor = AutoProcessor.from_pretrained(final)
    from csr_plugin.multimodal import chat_prompt

    inputs = processor(images=Image.open(tmp_path / "world" / "images" / "1.png").convert("RGB"),
                       text=chat_prompt(processor, "Describe the image."), return_tensors="pt")
    generated = trained.float().generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    report = tmp_path / "eval.json"
    assert main(["eval", "--config", str(config), "--model", str(final), "--out", str(report)]) == 0
    report = json.loads(report.read_text())
    assert 0.0 <= report["chair_s"] <= 1.0 and len(report["samples"]) == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_scorer_batches_every_family_like_one_at_a_time(family, family_root, tmp_path):
    """The scorer's one forward over unequal prompts (image sizes, tiles, M-RoPE) gives each response
    the R_T it gets alone (lambda 0: reward = R_T), for sampled ids and for text."""
    from transformers import AutoModelForImageTextToText

    from csr_plugin.config import recipe_from_dict
    from csr_plugin.multimodal import chat_prompt
    from csr_plugin.openrlhf.response_reward import ResponseItem, ResponseRewardScorer
    from fakes import ScriptedClip

    path = _family(family_root, family)
    processor = load_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    recipe = recipe_from_dict({"model": {"path": str(path)}, "output_dir": str(tmp_path),
                               "reward": {"lambda": 0.0}, "search": {"delimiters": ["."]}})
    scorer = ResponseRewardScorer(model, processor, ScriptedClip(), recipe)
    items = []
    for i, (question, size) in enumerate(zip(QUESTIONS, SIZES)):
        image = tmp_path / f"{i}.png"
        Image.new("RGB", size, (40 + 100 * i, 120, 200)).save(image)
        text = " There is a red circle. It is big." if i else " A blue square."
        ids = tuple(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        items += [ResponseItem(chat_prompt(processor, question), text, str(image)),
                  ResponseItem(chat_prompt(processor, question), "", str(image), ids)]
    together = scorer.score(items)
    # the one-sentence response by ids against a plain forward: R_T = mean log p of exactly its ids
    prompt_ids = processor(images=Image.open(items[1].image).convert("RGB"), text=items[1].prompt_text,
                           add_special_tokens=False)["input_ids"][0]
    prompt_ids = list(prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)
    plain = _plain_logp(model, processor, items[1].image, items[1].prompt_text, prompt_ids,
                        list(items[1].response_ids), add_special_tokens=False)[len(prompt_ids) - 1:]
    assert together[1].sentences[0]["r_t"] == pytest.approx(plain.mean().item(), abs=1e-4)
    for item, scored in zip(items, together):
        alone = scorer.score([item])[0]
        assert [s["r_t"] for s in scored.sentences] == pytest.approx([s["r_t"] for s in alone.sentences], abs=1e-4)
        assert scored.sentences and all(s["r_t"] < 0 for s in scored.sentences)
