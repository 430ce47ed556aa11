"""`csr sample`: resumable after a kill, bad inputs set aside with a reason."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from csr_plugin.config import recipe_from_dict
from csr_plugin.jsonl import JsonlAppender, load_records
from csr_plugin.sampling.local import build_clip, build_engine, sample

REPO = Path(__file__).resolve().parent.parent


def _write_prompts(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w") as f:
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 20 % 255, 80, 160)).save(folder / f"{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"{i}.png", "question": "Describe the image."}) + "\n")
    return folder / "prompts.jsonl"


@pytest.fixture(scope="module")
def engine_and_clip(tiny_recipe_dict):
    recipe = recipe_from_dict(tiny_recipe_dict)
    return build_engine(recipe), build_clip(recipe)


def _recipe(base, prompts, out, **search):
    data = json.loads(json.dumps(base))
    data["data"]["prompts"] = str(prompts)
    data["output_dir"] = str(out)
    data["search"].update(search)
    return recipe_from_dict(data)


class _Killed(BaseException):
    pass


class _DiesOnCall:
    """Wraps the engine and raises like a kill on its n-th expand call."""

    def __init__(self, engine, die_on):
        self.engine, self.die_on, self.calls = engine, die_on, 0
        self.max_context = engine.max_context

    def encode_prompt(self, *args):
        return self.engine.encode_prompt(*args)

    def expand(self, requests):
        self.calls += 1
        if self.calls == self.die_on:
            raise _Killed()
        return self.engine.expand(requests)


def test_killed_then_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_recipe_dict, engine_and_clip):
    engine, clip = engine_and_clip
    prompts = _write_prompts(tmp_path / "data", 7)
    full = _recipe(tiny_recipe_dict, prompts, tmp_path / "full", batch_prompts=2)
    sample(full, engine, clip, progress=False)

    broken = _recipe(tiny_recipe_dict, prompts, tmp_path / "broken", batch_prompts=2)
    with pytest.raises(_Killed):   # dies inside the second batch: 2 trees written
        sample(broken, _DiesOnCall(engine, die_on=5), clip, progress=False)
    trees_path = tmp_path / "broken" / "trees.jsonl"
    assert len(load_records(trees_path)) == 2
    with open(trees_path, "a") as f:   # and a torn half-written line, as a SIGKILL mid-write leaves
        f.write('{"id": "q2", "image": "x", "nod')
    summary = sample(broken, engine, clip, progress=False)
    assert (summary.resumed, summary.done) == (2, 5)
    resumed = load_records(trees_path)
    assert sorted(t["id"] for t in resumed) == [f"q{i}" for i in range(7)]   # every id exactly once
    by_id = {t["id"]: t for t in load_records(tmp_path / "full" / "trees.jsonl")}
    assert all(t == by_id[t["id"]] for t in resumed), "per-request seeds make a resumed run draw the same trees"
    again = sample(broken, engine, clip, progress=False)   # a finished run is a no-op
    assert (again.done, again.resumed) == (0, 7) and len(load_records(trees_path)) == 7


def test_sigkill_at_any_point_loses_and_duplicates_nothing(tmp_path, tiny_recipe_dict):
    prompts = _write_prompts(tmp_path / "data", 40)
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["data"]["prompts"] = str(prompts)
    recipe["output_dir"] = str(tmp_path / "out")
    recipe["search"].update({"batch_prompts": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "csr_plugin.cli", "sample", "--config", str(tmp_path / "r.yaml"), "--quiet"]
    trees = tmp_path / "out" / "trees.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not trees.exists() or trees.read_text().count("\n") < 3):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = trees.read_text().count("\n")
    assert 3 <= written < 40, "the kill must land mid-run"
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    ids = [t["id"] for t in load_records(trees)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(40))


def test_bad_inputs_go_to_errors_jsonl_and_the_run_continues(tmp_path, tiny_recipe_dict, engine_and_clip):
    engine, clip = engine_and_clip
    data = tmp_path / "data"
    _write_prompts(data, 2)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    whole = (data / "0.png").read_bytes()
    (data / "truncated.png").write_bytes(whole[: len(whole) // 2])
    lines = (data / "prompts.jsonl").read_text().splitlines() + [
        json.dumps({"id": "missing", "image": "nope.png", "question": "Describe."}),
        json.dumps({"id": "corrupt", "image": "corrupt.png", "question": "Describe."}),
        json.dumps({"id": "truncated", "image": "truncated.png", "question": "Describe."}),
        json.dumps({"id": "empty", "image": "0.png", "question": "   "}),
        json.dumps({"id": "long", "image": "0.png", "question": "circle " * 1200}),
        json.dumps({"id": "noimage", "question": "Describe."}),
        json.dumps({"id": "q0", "image": "0.png", "question": "again"}),
        "{not json",
    ]
    (data / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    recipe = _recipe(tiny_recipe_dict, data / "prompts.jsonl", tmp_path / "out")
    summary = sample(recipe, engine, clip, progress=False)
    assert summary.done == 2
    errors = {e["id"]: e["reason"] for e in load_records(tmp_path / "out" / "errors.jsonl")}
    assert errors["missing"].startswith("image not found")
    assert errors["corrupt"].startswith("image unreadable or corrupt")
    assert errors["truncated"].startswith("image unreadable or corrupt")
    assert errors["empty"].startswith("empty question")
    assert errors["long"].startswith("prompt too long") and "context of 1024" in errors["long"]
    assert errors["noimage"].startswith("no image")
    assert errors["q0"].startswith("duplicate id")
    assert errors["line:10"].startswith("invalid line: line 10 is not valid JSON")
    assert sum(summary.skipped.values()) == 8
    assert "skipped 2: image unreadable or corrupt" in str(summary)
    # a rerun retries the failures but does not log the same error twice
    sample(recipe, engine, clip, progress=False)
    assert len(load_records(tmp_path / "out" / "errors.jsonl")) == 8


def test_a_prompt_that_breaks_the_search_is_isolated(tmp_path, tiny_recipe_dict, engine_and_clip):
    engine, clip = engine_and_clip

    class Fragile:
        max_context = engine.max_context

        def encode_prompt(self, question, image):
            encoded = engine.encode_prompt(question, image)
            encoded.image_inputs = dict(encoded.image_inputs, poison=question == "poison")
            return encoded

        def expand(self, requests):
            if any(r.prompt.image_inputs["poison"] for r in requests):
                raise RuntimeError("CUDA out of memory (simulated)")
            clean = [type(r)(type(r.prompt)(r.prompt.token_ids, {k: v for k, v in r.prompt.image_inputs.items()
                                                                 if k != "poison"}), r.prefix_ids, r.n, r.seed)
                     for r in requests]
            return engine.expand(clean)

    prompts = _write_prompts(tmp_path / "data", 4)
    lines = prompts.read_text().splitlines()
    lines[1] = lines[1].replace("Describe the image.", "poison")
    prompts.write_text("\n".join(lines) + "\n")
    summary = sample(_recipe(tiny_recipe_dict, prompts, tmp_path / "out", batch_prompts=4), Fragile(), clip,
                     progress=False)
    assert summary.done == 3
    errors = load_records(tmp_path / "out" / "errors.jsonl")
    assert [(e["id"], e["reason"]) for e in errors] == [("q1", "search failed: RuntimeError: CUDA out of memory "
                                                                 "(simulated)")]


def test_appender_repairs_a_torn_tail(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "te')
    with JsonlAppender(path) as out:
        assert out.repaired and [r["id"] for r in out.records] == [1, 2]
        out.append({"id": 3})
    assert [r["id"] for r in load_records(path)] == [1, 2, 3]
