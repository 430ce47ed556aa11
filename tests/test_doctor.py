"""`csr doctor` and the GPU preflight: a driver too old for torch's CUDA must stop a run, not turn it into a
CPU run. No GPU here: a stand-in `nvidia-smi` on PATH plays a node with an H100 on a 550 driver, while this
machine's torch (a CUDA 13.0 build) sees no GPU, as it would on that node."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from csr_plugin import doctor

REPO = Path(__file__).resolve().parent.parent
STAND_IN = """#!/bin/sh
if [ "$1" = "-L" ]; then
  echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
  exit 0
fi
echo "| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |"
"""


@pytest.fixture
def stand_in_smi(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    exe = folder / "nvidia-smi"
    exe.write_text(STAND_IN)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return folder


def _needs_cpu_only_torch():
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: the mismatch cannot be staged")


def _doctor(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "csr_plugin.cli", "doctor"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


def test_doctor_exits_1_naming_the_driver_and_cuda_mismatch(stand_in_smi):
    _needs_cpu_only_torch()
    import torch

    done = _doctor(dict(os.environ))
    assert done.returncode == 1, done.stdout + done.stderr
    error = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(error) == 1, done.stdout
    assert "nvidia-smi lists 1 GPU (driver 550.54.15, which supports CUDA <= 12.4)" in error[0]
    assert f"torch {torch.__version__} cannot use it" in error[0]
    if torch.version.cuda and torch.version.cuda.startswith("13."):
        assert f"built for CUDA {torch.version.cuda}, which needs an NVIDIA driver >= 580" in error[0]
        assert "Fix: upgrade the driver to >= 580, or install a torch built for CUDA 12.4 or older" in error[0]
    assert "GPUs         none usable by torch (1 listed by nvidia-smi)" in done.stdout
    assert done.stderr.strip() == "", "library warnings reached the terminal: " + done.stderr


def test_doctor_on_this_cpu_machine_exits_0_and_says_cpu():
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an nvidia-smi")
    done = _doctor(dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no nvidia-smi on PATH" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("result: CPU")
    # every part of the stack is named, each on its own line
    for part in ("torch ", "driver ", "GPUs ", "flash-attn ", "vLLM ", "DeepSpeed ", "OpenRLHF ", "others "):
        assert any(line.startswith(part) for line in done.stdout.splitlines()), (part, done.stdout)
    assert "ray " in done.stdout
    assert done.stderr.strip() == "", "library warnings reached the terminal: " + done.stderr


def test_gpu_commands_stop_before_their_first_stage(stand_in_smi, tmp_path, tiny_recipe_dict, capsys):
    """`csr sample` (and run, train-dpo, train-ppo: the same call) stops before loading anything: no trees."""
    _needs_cpu_only_torch()
    from csr_plugin.cli import main

    recipe = dict(tiny_recipe_dict, output_dir=str(tmp_path / "out"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["sample", "--config", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "csr sample: error: nvidia-smi lists 1 GPU" in err and "`csr doctor`" in err
    assert not (tmp_path / "out" / "trees.jsonl").exists()


def test_preflight_is_silent_without_nvidia_smi_and_when_gpus_are_hidden(stand_in_smi, monkeypatch):
    _needs_cpu_only_torch()
    with pytest.raises(doctor.GpuUnusable, match="driver >= 580|cannot use it"):
        doctor.preflight("train-dpo")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # GPUs hidden on purpose: a CPU run is what was asked for
    doctor.preflight("train-dpo")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])   # the stand-in gone
    if shutil.which("nvidia-smi") is None:
        doctor.preflight("train-dpo")


def test_mismatch_names_a_cpu_only_torch_and_a_new_enough_driver():
    smi = doctor.NvidiaSmi(gpus=["GPU 0: A"], driver="590.10", cuda="13.1")
    cpu_torch = doctor.TorchCuda("2.14.1+cpu", None, False, [], "")
    assert "CPU-only build" in doctor.mismatch(smi, cpu_torch)
    cuda_torch = doctor.TorchCuda("2.14.1", "13.0", False, [], "CUDA unknown error")
    text = doctor.mismatch(smi, cuda_torch)
    assert "driver >=" not in text and "/dev/nvidia" in text and "CUDA unknown error" in text
    assert doctor.mismatch(smi, doctor.TorchCuda("2.14.1", "13.0", True, ["H100"], "")) is None
    assert doctor.mismatch(None, cuda_torch) is None


@pytest.mark.parametrize("command", [["run"], ["train-dpo"], ["train-rm", "--pairs", "PAIRS"], ["train-ppo"],
                                     ["eval"], ["sample"]])
def test_every_gpu_command_runs_the_preflight_before_its_first_stage(command, tmp_path, tiny_recipe_dict,
                                                                     monkeypatch, capsys):
    """Each GPU command stops at the preflight with exit code 1 and the reason, before anything runs."""
    from csr_plugin import cli

    def refuse(name):
        raise doctor.GpuUnusable(f"stand-in refusal for {name}")

    monkeypatch.setattr(cli, "preflight", refuse)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    recipe = dict(tiny_recipe_dict, output_dir=str(tmp_path / "out"), dpo={"pairs": str(pairs)},
                  eval={"prompts": str(pairs), "truth": str(pairs), "vocabulary": str(pairs)})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    argv = [a.replace("PAIRS", str(pairs)) for a in command] + ["--config", str(path)]
    assert cli.main(argv) == 1
    assert f"csr {command[0]}: error: stand-in refusal for {command[0]}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "trees.jsonl").exists() and not (tmp_path / "out" / "iter_1").exists()
