"""What this machine's GPU stack offers, decided in one place: the device and dtype a recipe's `auto`
settings resolve to, flash-attn's kernels (and the attention a recipe gets without them), and GPU memory
handed from one stage to the next.

flash-attn is installed in one of two ways (scripts/setup_env.sh): with its CUDA kernels (the compiled
``flash_attn_2_cuda`` module, from a prebuilt wheel for the installed torch), or as pure Python where no
such wheel exists. OpenRLHF imports ``flash_attn.bert_padding`` at import time, and the pure-Python
install imports only with ``FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE`` (its Triton backend instead of the
missing kernels). Whether to set it depends on the install, not on whether torch sees a GPU: on an
NVIDIA GPU with the kernels the variable would switch them off, and on a GPU without them nothing
imports unless it is set. Cheap to import: torch loads only when memory is released.
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

FLASH_TRITON_VAR = "FLASH_ATTENTION_TRITON_AMD_ENABLE"


def resolve_device(device: str):
    """A `device` setting (model.device, clip.device) as a torch device: auto = cuda where torch sees a GPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def dtype_name(dtype: str, gpu: bool) -> str:
    """torch dtype name of a `dtype` setting: auto = bfloat16 on a GPU, float32 on CPU (no fast bf16 there)."""
    if dtype == "auto":
        return "bfloat16" if gpu else "float32"
    return dtype


def resolve_dtype(name: str, device):
    """The torch dtype of a `dtype` setting for a model on ``device`` (a torch.device)."""
    import torch

    return getattr(torch, dtype_name(name, gpu=device.type == "cuda"))


def vllm_dtype(dtype: str) -> str:
    """vLLM's dtype for a `model.dtype` setting: auto = bfloat16, since vLLM's own auto would turn a
    float32 checkpoint into float16 (and its CPU build runs bfloat16)."""
    return "bfloat16" if dtype == "auto" else dtype


def flash_attn_kernels() -> bool:
    """Whether the installed flash-attn has its CUDA kernels (found, not loaded: a lookup on the path)."""
    return importlib.util.find_spec("flash_attn_2_cuda") is not None


def flash_attn_env() -> dict[str, str]:
    """What a process needs in its environment to import flash-attn as installed here: the Triton switch
    for the pure-Python install, nothing where the CUDA kernels are there. For Ray actors and ranks, which
    are assumed to run the same install as this process (docs/install.md)."""
    return {} if flash_attn_kernels() else {FLASH_TRITON_VAR: "TRUE"}


def enable_flash_attn_import() -> None:
    """Make ``import flash_attn`` (and so ``import openrlhf.models``) work in this process; must run before
    flash_attn is first imported. A value the user set wins."""
    for name, value in flash_attn_env().items():
        os.environ.setdefault(name, value)


def attention(requested: str, key: str) -> str:
    """The attention implementation a model gets for ``requested`` (the recipe's ``key``): a flash-attn
    implementation without the kernels falls back to PyTorch's sdpa, said once per call, not silently."""
    if requested.startswith("flash_attention") and not flash_attn_kernels():
        log.warning("%s: %s needs flash-attn's CUDA kernels, which the installed flash-attn does not have "
                    "(no prebuilt build for this torch; docs/install.md): using sdpa instead. Set %s=sdpa to "
                    "silence this.", key, requested, key)
        return "sdpa"
    return requested


def release_memory() -> None:
    """Hand the GPU to the next stage: collect what the last one dropped (models held in reference
    cycles) and return torch's cached blocks to the driver. vLLM checks at start that its
    gpu_memory_utilization share is free, and DPO ranks are separate processes: neither sees memory
    this process's caching allocator still holds."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
