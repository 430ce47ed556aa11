"""`csr sample --ray`: killed actors, resumed runs and poison prompts lose nothing and duplicate nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from csr_plugin.config import recipe_from_dict
from csr_plugin.jsonl import load_records
from csr_plugin.sampling.ray_driver import sample_on_ray
from csr_plugin.sampling.local import sample

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")

POISON = "poison"
REPO = Path(__file__).resolve().parent.parent


def _die_on_poison():
    """Ray worker setup hook: a worker searching the prompt `poison` dies as a segfault or OOM kill would."""
    import os

    from csr_plugin.sampling.search import SentenceBeamSearch

    run = SentenceBeamSearch.run

    def run_or_die(self, jobs):
        if any(job.id == POISON for job in jobs):
            os._exit(1)
        return run(self, jobs)

    SentenceBeamSearch.run = run_or_die


@pytest.fixture(scope="module")
def cluster():
    # the hook travels by value: Ray workers cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # 3 CPUs for 2 actors: a replacement need not wait for the dead actor's CPU to be released
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _die_on_poison})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def make_recipe(tiny_recipe_dict):
    def make(out, prompts=None, **search):
        data = json.loads(json.dumps(tiny_recipe_dict))
        data["output_dir"] = str(out)
        data["search"].update({"max_sentences": 2, "max_new_tokens": 8, "batch_prompts": 1}, **search)
        if prompts:
            data["data"]["prompts"] = str(prompts)
        return recipe_from_dict(data)
    return make


@pytest.fixture(scope="module")
def serial_trees(make_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    sample(make_recipe(out), progress=False)
    return {tree["id"]: tree for tree in load_records(out / "trees.jsonl")}


def _assert_same_trees(trees: list[dict], expected: dict[str, dict]) -> None:
    ids = [tree["id"] for tree in trees]
    assert sorted(ids) == sorted(expected), "every prompt exactly once"
    for tree in trees:
        want = expected[tree["id"]]
        assert [(n["parent"], n["text"], n["token_ids"]) for n in tree["nodes"]] == \
               [(n["parent"], n["text"], n["token_ids"]) for n in want["nodes"]]
        # CLIP batches differ between the runs: float rounding only
        assert [n["reward"] for n in tree["nodes"]] == pytest.approx([n["reward"] for n in want["nodes"]], rel=1e-5)


def test_a_killed_actor_loses_nothing_and_its_chunks_are_redone(cluster, make_recipe, serial_trees, tmp_path):
    seen, killed = set(), []

    def kill_one_after_the_first_tree(done, actors):
        seen.update(a._actor_id.hex() for a in actors)
        if done >= 1 and not killed:
            killed.append(actors[0]._actor_id.hex())
            ray.kill(actors[0], no_restart=True)

    summary = sample_on_ray(make_recipe(tmp_path), num_actors=2, progress=False,
                            on_progress=kill_one_after_the_first_tree)
    assert killed and len(seen - set(killed)) >= 2, "a replacement actor took over"
    assert (summary.done, summary.resumed, sum(summary.skipped.values())) == (len(serial_trees), 0, 0)
    _assert_same_trees(load_records(tmp_path / "trees.jsonl"), serial_trees)
    assert not (tmp_path / "errors.jsonl").read_text()


def test_resume_searches_only_the_missing_ids(cluster, make_recipe, serial_trees, tmp_path):
    ids = sorted(serial_trees)
    with open(tmp_path / "trees.jsonl", "w") as f:
        for prompt_id in ids[:3]:
            f.write(json.dumps(serial_trees[prompt_id]) + "\n")
        f.write('{"id": "%s", "image": "x", "nod' % ids[3])   # the torn line a killed driver leaves
    summary = sample_on_ray(make_recipe(tmp_path), num_actors=2, progress=False)
    assert (summary.resumed, summary.done) == (3, len(ids) - 3)
    _assert_same_trees(load_records(tmp_path / "trees.jsonl"), serial_trees)
    again = sample_on_ray(make_recipe(tmp_path), num_actors=2, progress=False)   # a finished run is a no-op
    assert (again.resumed, again.done) == (len(ids), 0)


def test_a_prompt_that_keeps_killing_actors_is_set_aside(cluster, make_recipe, serial_trees, tiny_root, tmp_path):
    folder = tiny_root / "prompts"
    records = [dict(r, image=str(folder / r["image"])) for r in load_records(folder / "prompts.jsonl")[:3]]
    records.insert(1, dict(records[0], id=POISON))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # chunks of 2: the poison's chunk dies max_attempts times, then its innocent partner is searched alone
    recipe = make_recipe(tmp_path / "out", prompts=tmp_path / "prompts.jsonl", batch_prompts=2)
    summary = sample_on_ray(recipe, num_actors=2, progress=False, max_attempts=2)
    assert summary.done == 3 and summary.skipped == {"actor died": 1}
    errors = load_records(tmp_path / "out" / "errors.jsonl")
    assert [e["id"] for e in errors] == [POISON]
    reason = errors[0]["reason"]
    assert reason.startswith("actor died: ") and reason.endswith("(after 2 attempts)")
    assert "pid" not in reason, "no per-process ids: a rerun failing alike logs nothing new"
    expected = {r["id"]: serial_trees[r["id"]] for r in records if r["id"] != POISON}
    _assert_same_trees(load_records(tmp_path / "out" / "trees.jsonl"), expected)


def test_a_killed_driver_resumes_without_losing_or_repeating_a_prompt(cluster, tiny_recipe_dict, tmp_path):
    from csr_plugin.toy.quickstart import write_prompts

    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["data"]["prompts"] = str(write_prompts(tmp_path / "prompts", 12, seed=5))
    recipe["output_dir"] = str(tmp_path / "out")
    recipe["search"].update({"max_sentences": 2, "max_new_tokens": 8, "batch_prompts": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    # a second driver on this module's cluster, as `--ray-address` joins any running cluster
    cmd = [sys.executable, "-m", "csr_plugin.cli", "sample", "--config", str(tmp_path / "r.yaml"), "--quiet",
           "--ray", "--actors", "2", "--ray-address", ray.get_runtime_context().gcs_address]
    trees = tmp_path / "out" / "trees.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not (trees.exists() and trees.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= trees.read_text().count("\n") < 12, "the kill must land mid-run"
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already done" in done.stdout
    ids = [tree["id"] for tree in load_records(trees)]
    assert sorted(ids) == [f"toy-{i:04d}" for i in range(12)], "every prompt exactly once"


def test_actors_that_cannot_load_the_models_stop_the_run(cluster, make_recipe, tmp_path):
    recipe = make_recipe(tmp_path / "out")
    recipe.model.path = str(tmp_path / "no-such-model")
    with pytest.raises(RuntimeError, match="could not load the models. Check model.path"):
        sample_on_ray(recipe, num_actors=2, progress=False)


@pytest.mark.slow   # three vLLM engine starts (a serial one, two actors, one replacement): ~3 min
def test_openrlhf_rollout_actors_with_our_agent_lose_nothing(cluster, make_recipe, tmp_path, tiny_clip):
    """OpenRLHF's real RolloutRayActor on real vLLM (CPU build), our agent loaded by its agent_func_path;
    one engine is killed mid-run. The trees equal a serial `csr sample` with search.engine: vllm."""
    from csr_plugin.sampling.vllm_engine import VllmEngine

    serial_out = tmp_path / "serial"
    recipe = make_recipe(serial_out, engine="vllm")
    engine = VllmEngine.from_config(recipe.model, recipe.search)
    sample(recipe, engine=engine, clip=tiny_clip, progress=False)
    engine.llm.llm_engine.engine_core.shutdown()
    expected = {tree["id"]: tree for tree in load_records(serial_out / "trees.jsonl")}

    killed = []

    def kill_one_engine(done, actors):
        if done >= 1 and not killed:
            killed.append(actors[0])
            ray.kill(actors[0], no_restart=True)

    out = tmp_path / "engines"
    summary = sample_on_ray(make_recipe(out, engine="vllm"), num_actors=2, progress=False, openrlhf_engines=True,
                            on_progress=kill_one_engine)
    assert killed
    assert (summary.done, sum(summary.skipped.values())) == (len(expected), 0)
    trees = load_records(out / "trees.jsonl")
    _assert_same_trees(trees, expected)
    assert [t["prompt"] for t in sorted(trees, key=lambda t: t["id"])] == \
           [expected[i]["prompt"] for i in sorted(expected)]   # the question, not the templated prompt
