"""`csr train-dpo` launching: a free rendezvous port by default, so runs on one machine never collide."""
import json
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

from csr_plugin.config import recipe_from_dict
from csr_plugin.training.launch import worker_command

REPO = Path(__file__).resolve().parent.parent


def _pairs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (32, 32), (200, 30 + i, 30)).save(folder / f"{i}.png")
        lines.append({"id": f"p{i}", "images": [str(folder / f"{i}.png")],
                      "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
                      "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}],
                      "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A blue star."}]}]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "pairs.jsonl"


def test_default_rendezvous_is_a_free_port_and_an_explicit_port_is_kept(tiny_recipe_dict):
    recipe = recipe_from_dict(tiny_recipe_dict)
    command = worker_command(recipe, "r.yaml", [], "m", "p.jsonl", "out")
    assert "--standalone" in command and not any(a.startswith("--master_port") for a in command)
    fixed = recipe_from_dict({**tiny_recipe_dict, "dpo": {"master_port": 29999}})
    assert "--master_port=29999" in worker_command(fixed, "r.yaml", [], "m", "p.jsonl", "out")
    hosts = recipe_from_dict({**tiny_recipe_dict, "dpo": {"hostfile": "hosts"}})
    command = worker_command(hosts, "r.yaml", [], "m", "p.jsonl", "out")
    port = int(command[command.index("--master_port") + 1])
    assert 1024 <= port <= 65535


def test_two_train_dpo_runs_at_once_on_one_machine_both_finish(tmp_path, tiny_recipe_dict):
    """One rank each is enough: the collision was two launchers binding the same rendezvous port."""
    pairs = _pairs(tmp_path / "data", 4)
    runs = []
    for name in ("a", "b"):
        recipe = json.loads(json.dumps(tiny_recipe_dict))
        recipe["output_dir"] = str(tmp_path / name)
        recipe["dpo"] = {"pairs": str(pairs), "nproc": 1, "batch": 2, "micro_batch": 1, "epochs": 1,
                         "ckpt_steps": 0}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        runs.append(subprocess.Popen([sys.executable, "-m", "csr_plugin.cli", "train-dpo", "--config",
                                      str(tmp_path / f"{name}.yaml")], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    for name, run in zip("ab", runs):
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, f"run {name}: " + output[-3000:]
        assert (tmp_path / name / "final" / ".complete").exists()


def test_flash_attn_rocm_switch_reaches_cpu_actors_only(monkeypatch):
    """FLASH_ATTENTION_TRITON_AMD_ENABLE makes flash-attn's pure-Python install importable, but where its
    CUDA kernels are installed it would switch them off: GPU actors get it only without them."""
    from csr_plugin import accelerator
    from csr_plugin.sampling.ray_actors import _actor_options

    monkeypatch.setattr(accelerator, "flash_attn_kernels", lambda: True)   # a GPU node with a prebuilt flash-attn
    gpu, cpu = _actor_options(True)["runtime_env"]["env_vars"], _actor_options(False)["runtime_env"]["env_vars"]
    assert "FLASH_ATTENTION_TRITON_AMD_ENABLE" not in gpu
    assert cpu["FLASH_ATTENTION_TRITON_AMD_ENABLE"] == "TRUE"
    assert "FLASH_ATTENTION_TRITON_AMD_ENABLE" not in (REPO / "Makefile").read_text()
