"""`csr run`: two CSR iterations, killed inside every stage and resumed, equal an uninterrupted run."""
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_recipe(tmp_path_factory, tiny_recipe_dict):
    from csr_plugin.toy.quickstart import write_prompts

    folder = tmp_path_factory.mktemp("run")
    prompts = write_prompts(folder / "prompts", 12, seed=3)
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["data"]["prompts"] = str(prompts)
    recipe["search"].update({"batch_prompts": 2, "max_sentences": 3, "max_new_tokens": 16})
    recipe["dpo"] = {"nproc": 2, "zero_stage": 3, "batch": 4, "micro_batch": 1, "epochs": 3, "lr": 1.0e-3,
                     "ckpt_steps": 2}
    recipe["loop"] = {"iterations": 2}

    def write(name):
        data = dict(recipe, output_dir=str(folder / name))
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path, folder / name
    return write


def _csr_run(config):
    return subprocess.Popen([sys.executable, "-m", "csr_plugin.cli", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_tree_when(process, ready, timeout=300):
    """SIGKILL the run and every rank it started (a crashed node) once ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the kill point:\n" + process.stdout.read()[-2000:]
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    tree = [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True)
    for proc in tree:
        proc.kill()
    process.wait()
    psutil.wait_procs(tree, timeout=30)


def _pairs(folder):
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    return [{"texts": (r["id"], r["chosen"], r["rejected"], r["images"]),
             "rewards": (r["chosen_reward"], r["rejected_reward"], r["chosen_r_i"], r["rejected_r_i"])} for r in rows]


def _lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def test_killed_in_every_stage_then_resumed_equals_uninterrupted(run_recipe):
    config, clean = run_recipe("clean")
    proc = _csr_run(config)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]

    config, broken = run_recipe("broken")
    kill_points = [
        lambda: 1 <= _lines(broken / "iter_1" / "trees.jsonl") < 12,            # inside sampling, iteration 1
        lambda: (broken / "iter_1" / "dpo" / "ds_ckpt" / "latest").exists(),    # inside DPO, iteration 1
        lambda: 1 <= _lines(broken / "iter_2" / "trees.jsonl") < 12,            # inside sampling, iteration 2
        lambda: (broken / "iter_2" / "dpo" / "ds_ckpt" / "latest").exists(),    # inside DPO, iteration 2
    ]
    for ready in kill_points:
        _kill_tree_when(_csr_run(config), ready)
    assert not (broken / "iter_2" / "dpo" / "final" / ".complete").exists()
    proc = _csr_run(config)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "DPO resuming from its last checkpoint" in out                        # the stage line says so
    assert "resumed DPO from" in (broken / "logs" / "dpo_iter2.log").read_text()  # and the ranks did

    for t in (1, 2):
        trees = [json.loads(line)["id"] for line in (broken / f"iter_{t}" / "trees.jsonl").read_text().splitlines()]
        assert sorted(trees) == sorted(set(trees)) and len(trees) == 12, "every prompt once"
        resumed, uninterrupted = _pairs(broken / f"iter_{t}"), _pairs(clean / f"iter_{t}")
        assert [p["texts"] for p in resumed] == [p["texts"] for p in uninterrupted], "the same pairs"
        # CLIP and decode batches differ after a resume (other prompts share them), and a kept beam's own KV
        # comes from its batch's decode: float32 rounding only. abs=1e-6 for rewards near 0, where a relative
        # bound alone is tighter than float32's rounding of a sum of log-probs (seen: 8.6e-7 on -0.068).
        flat = lambda pairs: [value for p in pairs for value in p["rewards"]]  # noqa: E731
        assert flat(resumed) == pytest.approx(flat(uninterrupted), rel=1e-5, abs=1e-6)
        steps = [json.loads(line)["global_step"]
                 for line in (broken / f"iter_{t}" / "dpo" / "dpo_metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)), "a resumed DPO run logs each step once"
    final = "iter_2/dpo/final/model.safetensors"
    assert (broken / final).read_bytes() == (clean / final).read_bytes(), "resumed training is exact"

    rows = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for key in ("pairs", "chosen_reward", "rejected_reward", "chosen_r_i", "rejected_r_i", "reward_margin",
                "dpo_last_loss_mean", "dpo_last_acc_mean", "dpo_last_logp_margin", "seconds_sample", "seconds_dpo"):
        assert all(r.get(key) is not None for r in rows), key
    assert (broken / "metrics.png").read_bytes()[:4] == b"\x89PNG"

    from transformers import AutoModelForImageTextToText, AutoProcessor
    from PIL import Image

    model = AutoModelForImageTextToText.from_pretrained(broken / "iter_2" / "dpo" / "final")
    processor = AutoProcessor.from_pretrained(broken / "iter_2" / "dpo" / "final")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "What shapes do you see?"}]}], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.new("RGB", (32, 32)), text=text, return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] > inputs["input_ids"].shape[1]
