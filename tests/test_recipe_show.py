"""`csr recipe show` prints exactly the pipelines a recipe has, each with the dtype it uses on this machine,
and the cheap commands keep library warnings (torch's pynvml FutureWarning, DeepSpeed's "Setting
accelerator to CPU") off the terminal."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csr_plugin.config import load_recipe
from csr_plugin.recipe_commands import pipelines, show

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "paper.yaml": ["dpo", "eval"], "official.yaml": ["dpo", "eval"], "qwen25vl-7b-dpo.yaml": ["dpo", "eval"],
    "tiny.yaml": ["dpo"], "toy.yaml": ["dpo", "eval"], "toy-describe.yaml": ["dpo", "eval"],
    "toy-paper.yaml": ["dpo", "eval"],
    "ppo-stepwise.yaml": ["ppo"], "toy-ppo.yaml": ["ppo", "eval"],
}
MARKERS = {"dpo": "csr run --config", "rm": "csr train-rm --config", "ppo": "ray job submit",
           "eval": "csr eval --config"}


def test_every_recipe_is_listed():
    assert sorted(EXPECTED) == sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("overrides, extra", [([], []), (["rm.pairs=p.jsonl"], ["rm"])])
def test_show_prints_exactly_the_pipelines_of_the_recipe(name, overrides, extra):
    path = f"recipes/{name}"
    expected = sorted(EXPECTED[name] + extra)
    assert sorted(pipelines(path, overrides)) == expected
    text = show(load_recipe(ROOT / path, overrides), path, overrides, gpu=False)
    for pipeline, marker in MARKERS.items():
        assert (marker in text) == (pipeline in expected), (pipeline, text)
    assert ("# PPO / REINFORCE" in text) == ("ppo" in expected) and ("CSR-DPO" in text) == ("dpo" in expected)


def test_dtypes_are_those_of_this_machine():
    recipe = load_recipe(ROOT / "recipes/toy.yaml", ["model.dtype=auto", "model.device=auto"])
    cpu, gpu = show(recipe, "recipes/toy.yaml", [], gpu=False), show(recipe, "recipes/toy.yaml", [], gpu=True)
    assert "here: CPU only" in cpu and "# DPO in fp32" in cpu and "transformers engine, float32" in cpu
    assert "--ds.param_dtype" not in cpu   # OpenRLHF's train_dpo CLI has no fp32: the flag is left out
    assert "here: a CUDA GPU" in gpu and "# DPO in bf16" in gpu and "--ds.param_dtype bf16" in gpu
    assert "transformers engine, bfloat16" in gpu
    forced = show(load_recipe(ROOT / "recipes/toy.yaml", ["dpo.dtype=bfloat16", "model.device=cpu"]),
                  "recipes/toy.yaml", [], gpu=True)
    assert "# DPO in bf16" in forced and "transformers engine, float32" in forced
    ppo = show(load_recipe(ROOT / "recipes/toy-ppo.yaml"), "recipes/toy-ppo.yaml", [], gpu=False)
    assert "step-wise rewards, bf16)" in ppo   # OpenRLHF's PPO has no fp32, on a CPU neither


@pytest.mark.parametrize("argv", [["recipe", "flags"], ["recipe", "show", "recipes/toy-ppo.yaml", "--check"]])
def test_cheap_commands_print_no_library_warnings(argv):
    env = dict(os.environ, PYTHONWARNINGS="default", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "csr_plugin.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    verbose = subprocess.run([sys.executable, "-m", "csr_plugin.cli", *argv, "-v"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    # -v shows everything: the same output, library chatter included
    assert verbose.returncode == 0 and set(proc.stdout.splitlines()) <= set(verbose.stdout.splitlines())
