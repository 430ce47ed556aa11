"""Multimodal DPO on OpenRLHF's DeepSpeed trainer: 2 CPU ranks, ZeRO-3, gloo."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor

REPO = Path(__file__).resolve().parent.parent


def _pair(i, image, chosen, rejected, question="Describe the image."):
    return {"id": f"h{i}", "images": [str(image)],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}


@pytest.fixture(scope="module")
def hand_pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    lines = []
    for i in range(8):
        image = folder / f"{i}.png"
        Image.new("RGB", (32, 32), (200 + i, 30, 30)).save(image)
        lines.append(_pair(i, image, "There is a red circle.", "There is a blue square."))
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _mean_logp_margin(model_path, pairs):
    """Mean over pairs of log p(chosen) - log p(rejected), one plain forward each, no DeepSpeed."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
    dataset = MultimodalPreferenceDataset(str(pairs), processor, 512)
    margins = []
    for item in dataset:
        logps = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([item["prompt_ids"] + item[key]])
            with torch.no_grad():
                logits = model(input_ids=ids, **item["image_inputs"]).logits[0, :-1].log_softmax(-1)
            picked = logits.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(item["prompt_ids"]) - 1:]
            logps.append(picked.sum().item())
        margins.append(logps[0] - logps[1])
    return sum(margins) / len(margins)


def test_dataset_tokenises_like_the_sampler(tiny_model_and_processor, hand_pairs):
    from conftest import make_engine

    processor = load_processor(str(Path(tiny_model_and_processor[0].name_or_path)))
    dataset = MultimodalPreferenceDataset(str(hand_pairs), processor, 512)
    item = dataset[0]
    engine = make_engine(tiny_model_and_processor)
    prompt = engine.encode_prompt("Describe the image.", Image.open(hand_pairs.parent / "0.png").convert("RGB"))
    assert item["prompt_ids"] == prompt.token_ids      # the trainer sees the prompt the sampler saw
    eos = processor.tokenizer.eos_token_id
    assert item["chosen_ids"][-1] == eos and item["rejected_ids"][-1] == eos
    assert processor.tokenizer.decode(item["chosen_ids"], skip_special_tokens=True).strip() == \
        "There is a red circle."
    chosen, c_mask, rejected, r_mask, prompts = dataset.collate_fn([dataset[0], dataset[1]])
    assert chosen.shape[0] == 2 and prompts.lengths == [len(item["prompt_ids"])] * 2
    assert prompts.image_inputs["pixel_values"].shape[0] == 2
    assert int(c_mask[0].sum()) == len(item["prompt_ids"]) + len(item["chosen_ids"])


def test_bad_pairs_are_skipped_with_a_reason(tmp_path, tiny_model_and_processor, hand_pairs):
    processor = load_processor(str(Path(tiny_model_and_processor[0].name_or_path)))
    good = hand_pairs.read_text().splitlines()[0]
    same = _pair(9, hand_pairs.parent / "0.png", "Same.", "Same.")
    missing = _pair(10, tmp_path / "nope.png", "a.", "b.")
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([good, json.dumps(same), json.dumps(missing), "{torn"]) + "\n")
    dataset = MultimodalPreferenceDataset(str(path), processor, 512)
    assert len(dataset) == 1 and len(dataset.skipped) == 3
    assert "identical" in dataset.skipped[0] and "image not found" in dataset.skipped[1]


def test_two_rank_zero3_dpo_learns_the_preference(tmp_path, tiny_recipe_dict, hand_pairs):
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["output_dir"] = str(tmp_path / "dpo")
    recipe["dpo"] = {"pairs": str(hand_pairs), "nproc": 2, "zero_stage": 3, "batch": 4, "micro_batch": 1,
                     "epochs": 4, "lr": 1.0e-3, "ckpt_steps": 0}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "train-dpo", "--config",
                             str(tmp_path / "r.yaml")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks_log = (tmp_path / "dpo" / "logs" / "dpo.log").read_text()    # quiet default: the ranks print there
    held = re.search(r"ZeRO-3: rank 0 holds (\d+)/(\d+) parameter elements", ranks_log)
    assert held and 0.45 < int(held.group(1)) / int(held.group(2)) < 0.55, "ZeRO-3 must split parameters 2 ways"

    rows = [json.loads(line) for line in (tmp_path / "dpo" / "dpo_metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == list(range(1, 9))
    assert rows[0]["loss_mean"] == pytest.approx(math.log(2), abs=1e-4)   # policy == reference at step 1
    assert rows[-1]["loss_mean"] < 0.55
    assert rows[0]["acc_mean"] == 0.0 and rows[-1]["acc_mean"] == 1.0
    assert rows[-1]["logp_margin"] > rows[0]["logp_margin"]

    base, final = tiny_recipe_dict["model"]["path"], str(tmp_path / "dpo" / "final")
    assert _mean_logp_margin(final, hand_pairs) > _mean_logp_margin(base, hand_pairs) + 1.0

    from transformers import AutoModelForImageTextToText, AutoProcessor

    before = AutoModelForImageTextToText.from_pretrained(base)
    after = AutoModelForImageTextToText.from_pretrained(final)
    changed = {n for (n, a), b in zip(after.named_parameters(), before.parameters()) if not torch.equal(a, b)}
    assert any("language_model" in n for n in changed)
    assert not any("vision_tower" in n for n in changed), "dpo.freeze_vision keeps the vision tower fixed"
    processor = AutoProcessor.from_pretrained(final)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "Describe the image."}]}], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), text=text, return_tensors="pt")
    out = after.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


_PEAK_RSS = r"""
import ctypes, json, sys
import psutil
from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor

process, libc = psutil.Process(), ctypes.CDLL("libc.so.6")
processor = load_processor(sys.argv[1])
# 64 px crops: 48 KB of fp32 pixels per pair
processor.image_processor.size = {"shortest_edge": 64}
processor.image_processor.crop_size = {"height": 64, "width": 64}

def epoch_peak_mb(path, hold):
    # the rise of RSS over its value before the epoch, at its highest (sampled after every batch)
    libc.malloc_trim(0)   # hand back what the previous epoch freed: each epoch starts from the same floor
    start = peak = process.memory_info().rss
    held = []
    dataset = MultimodalPreferenceDataset(path, processor, 2048)
    for i in range(0, len(dataset) - 1, 2):   # one epoch, micro-batches of 2
        items = [dataset[i], dataset[i + 1]]
        dataset.collate_fn(items)
        if hold:   # the control: keep every pair's pixels, as the eager dataset did
            held.extend(it["image_inputs"]["pixel_values"] for it in items)
        peak = max(peak, process.memory_info().rss)
    return (peak - start) / 2**20

epoch_peak_mb(sys.argv[2], False)   # warm-up: tokenizer and processor caches, allocator pools
print(json.dumps([epoch_peak_mb(sys.argv[2], False), epoch_peak_mb(sys.argv[3], False),
                  epoch_peak_mb(sys.argv[3], True)]))
"""


def test_memory_does_not_grow_with_the_number_of_pairs(tmp_path, hand_pairs):
    """Peak RSS over a whole epoch (every pair read, its image decoded and processed, batched; sampled
    after each batch, as the rise over RSS before the epoch) for 200 and for 2,000 pairs.

    The lazy dataset must stay within 16 MiB from 200 to 2,000 pairs (allocator noise; observed:
    under 2 MiB). A control epoch then keeps every pair's pixels, as the eager dataset did:
    2,000 x 3x64x64 fp32 = 94 MiB. It must rise by more than 64 MiB, so the measurement does see a
    dataset whose memory grows with its pairs."""
    from csr_plugin.toy.tiny_families import build_tiny_family

    model = build_tiny_family("llava", tmp_path / "llava")
    lines = hand_pairs.read_text().splitlines()
    paths = []
    for n in (200, 2000):
        paths.append(tmp_path / f"pairs{n}.jsonl")
        paths[-1].write_text("\n".join(lines[i % len(lines)] for i in range(n)) + "\n")
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(model), *map(str, paths)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    small, large, eager = json.loads(result.stdout.strip().splitlines()[-1])
    assert large - small < 16, (small, large)
    assert eager - large > 64, (large, eager)


def test_a_pair_whose_image_breaks_during_training_is_replaced(tmp_path, tiny_model_and_processor, hand_pairs):
    """Every rank must run the same steps with full micro-batches (ZeRO-3 collectives): the broken
    pair is swapped for the next one, logged once and added to the skip list."""
    import shutil

    processor = load_processor(str(Path(tiny_model_and_processor[0].name_or_path)))
    folder = tmp_path / "imgs"
    shutil.copytree(hand_pairs.parent, folder, ignore=shutil.ignore_patterns("*.jsonl"))
    path = tmp_path / "p.jsonl"
    path.write_text(hand_pairs.read_text().replace(str(hand_pairs.parent), str(folder)))
    dataset = MultimodalPreferenceDataset(str(path), processor, 512)
    assert len(dataset) == 8 and dataset.skipped == []
    expected_next = dataset[4]
    (folder / "3.png").write_bytes(b"not a png any more")
    item = dataset[3]
    assert item["prompt_ids"] == expected_next["prompt_ids"]
    assert torch.equal(item["image_inputs"]["pixel_values"], expected_next["image_inputs"]["pixel_values"])
    assert len(dataset.skipped) == 1 and dataset.skipped[0].startswith("line 4: image unreadable or corrupt")
    dataset[3]
    assert len(dataset.skipped) == 1   # reported once
    for name in os.listdir(folder):
        os.remove(folder / name)
    with pytest.raises(ValueError, match="no pair of .* is usable any more"):
        dataset[0]
