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
    assert _held_after_loading(ranks_log, "auto") == 0.5, "dpo.zero3_init: auto loads into partitions, as on GPUs"

    rows = [json.loads(line) for line in (tmp_path / "dpo" / "dpo_metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == list(range(1, 9))
    assert rows[0]["loss_mean"] == pytest.approx(math.log(2), abs=1e-4)   # policy == reference at step 1
    assert rows[-1]["loss_mean"] < 0.55
    assert rows[0]["acc_mean"] == 0.0 and rows[-1]["acc_mean"] == 1.0
    assert rows[-1]["logp_margin"] > rows[0]["logp_margin"]

    base, final = tiny_recipe_dict["model"]["path"], str(tmp_path / "dpo" / "final")
    assert _mean_logp_margin(final, hand_pairs) > _mean_logp_margin(base, hand_pairs) + 1.0

    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(base)
    after = AutoModelForImageTextToText.from_pretrained(final)
    changed = {n for (n, a), b in zip(after.named_parameters(), before.parameters()) if not torch.equal(a, b)}
    assert any("language_model" in n for n in changed)
    assert not any("vision_tower" in n for n in changed), "dpo.freeze_vision keeps the vision tower fixed"
    _assert_samples(final)


def _assert_samples(final) -> dict:
    """final/ loads as a plain HF checkpoint with its processor and generates; returns its parameters."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(final)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "Describe the image."}]}], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return dict(model.named_parameters())


def _held_after_loading(ranks_log: str, setting: str) -> float:
    """The share of the parameters rank 0 held right after loading, as dpo_main prints it."""
    held = re.search(rf"ZeRO-3 load \(dpo.zero3_init: {setting}\): rank 0 holds (\d+)/(\d+)", ranks_log)
    assert held, f"no ZeRO-3 load line for zero3_init {setting} in the ranks' log"
    return round(int(held.group(1)) / int(held.group(2)), 2)


def _train(tmp_path, tiny_recipe_dict, pairs, name: str, **dpo) -> tuple[Path, str]:
    """`csr train-dpo` on 2 gloo ranks, ZeRO-3: 8 pairs, batch 4 = 2 optimizer steps. -> output, ranks' log."""
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["output_dir"] = str(tmp_path / name)
    recipe["dpo"] = {"pairs": str(pairs), "nproc": 2, "zero_stage": 3, "batch": 4, "micro_batch": 1, "epochs": 1,
                     "lr": 1.0e-3, "warmup_ratio": 0.0, "ckpt_steps": 0, **dpo}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    # ~20 s here; 300 s catches a hang (the LoRA merge under a live ZeRO-3 config waited forever)
    result = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "train-dpo", "--config",
                             str(tmp_path / f"{name}.yaml")], cwd=REPO, capture_output=True, text=True, timeout=300)
    log = tmp_path / name / "logs" / "dpo.log"
    ranks_log = log.read_text() if log.exists() else ""
    assert result.returncode == 0, result.stderr[-3000:] + ranks_log[-3000:]
    return tmp_path / name, ranks_log


_EXACT_LOADS = r"""
import sys
import deepspeed, torch
from transformers import AutoModelForImageTextToText
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from csr_plugin.config import recipe_from_dict
from csr_plugin.training.device import make_strategy
from csr_plugin.training.dpo_main import load_actor
from csr_plugin.training.openrlhf_args import as_namespace, dpo_flags

path, loads = sys.argv[1], int(sys.argv[2])
recipe = recipe_from_dict({"model": {"path": path}, "output_dir": "unused", "dpo": {"zero3_init": "on"}})
strategy = make_strategy(as_namespace(dpo_flags(recipe.dpo, path, "p.jsonl", "unused")))
strategy.setup_distributed()
whole = dict(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).named_parameters())
for _ in range(loads):
    model = load_actor(path, recipe.dpo, strategy.get_ds_train_config(), True).model
    assert not is_deepspeed_zero3_enabled(), "the ZeRO-3 config must not outlive the load"
    for name, param in model.named_parameters():
        assert hasattr(param, "ds_tensor"), f"{name} was not partitioned as it loaded"
        with deepspeed.zero.GatheredParameters([param]):
            assert torch.equal(param.data, whole[name]), f"{name} is not the checkpoint's after the load"
print("exact loads:", loads)
"""


def test_zero3_init_loads_exactly_the_checkpoint_on_gloo(tmp_path, tiny_recipe_dict):
    """The partitioned load on 2 gloo ranks, 10 times: every parameter partitioned and, gathered, equal to
    the checkpoint; transformers' ZeRO-3 switch off again afterwards. With ZeRO-3's coalesced gather 9
    loads in 20 had a corrupted tensor, so 10 clean loads in a row would happen by chance 0.3% of the time."""
    script = tmp_path / "exact_loads.py"
    script.write_text(_EXACT_LOADS)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), tiny_recipe_dict["model"]["path"], "10"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "exact loads: 10" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_zero3_init_on_needs_zero_stage_3(tiny_recipe_dict):
    from csr_plugin.config import ConfigError, recipe_from_dict

    with pytest.raises(ConfigError, match=r"`dpo.zero3_init: on`.*`dpo.zero_stage` is 2"):
        recipe_from_dict({**tiny_recipe_dict, "dpo": {"zero3_init": "on", "zero_stage": 2}})
    assert recipe_from_dict({**tiny_recipe_dict, "dpo": {"zero_stage": 2}}).dpo.zero3_init == "auto"


def test_zero3_init_loads_into_partitions_and_trains_the_same_weights_as_a_whole_load(
        tmp_path, tiny_recipe_dict, hand_pairs):
    """dpo.zero3_init on (transformers' zero.Init load, on gloo) vs off (each rank loads the whole model,
    DeepSpeed partitions it at engine start): the same checkpoint values in the same partitions and the
    same parameter order, so the same gradients and updates. Exact equality, no tolerance (observed: every
    tensor and every logged number identical)."""
    on, on_log = _train(tmp_path, tiny_recipe_dict, hand_pairs, "on", zero3_init="on")
    off, off_log = _train(tmp_path, tiny_recipe_dict, hand_pairs, "off", zero3_init="off")
    assert _held_after_loading(on_log, "on") == 0.5 and _held_after_loading(off_log, "off") == 1.0
    assert (on / "dpo_metrics.jsonl").read_text() == (off / "dpo_metrics.jsonl").read_text()
    trained, whole = _assert_samples(on / "final"), _assert_samples(off / "final")
    differ = {name: float((trained[name] - whole[name]).abs().max()) for name in whole
              if not torch.equal(trained[name], whole[name])}
    assert trained.keys() == whole.keys() and not differ, f"zero3_init on vs off differ (max abs diff): {differ}"
    base = _assert_samples(tiny_recipe_dict["model"]["path"])
    assert any(not torch.equal(trained[n], base[n]) for n in base if "language_model" in n), "2 steps trained"


def test_zero3_init_lora_merges_into_a_whole_checkpoint(tmp_path, tiny_recipe_dict, hand_pairs):
    """LoRA under the partitioned load, merged at the end: rank 0 loads the base model for the merge while
    the others wait, so no ZeRO-3 config may be left to put that load inside zero.Init (it hung)."""
    out, ranks_log = _train(tmp_path, tiny_recipe_dict, hand_pairs, "lora", zero3_init="on", lora_rank=8,
                            lora_alpha=16)
    assert _held_after_loading(ranks_log, "on") < 0.6   # the base weights halved; the LoRA matrices are whole
    final = out / "final"
    assert (final / ".complete").exists() and not list(final.glob("adapter_*")), "merged: no adapter left"
    merged, base = _assert_samples(final), _assert_samples(tiny_recipe_dict["model"]["path"])
    assert merged.keys() == base.keys()
    changed = {n for n in base if not torch.equal(merged[n], base[n])}
    assert changed and all("language_model" in n for n in changed), "LoRA adapts the language model only"


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
