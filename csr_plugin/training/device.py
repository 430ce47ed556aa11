"""The one place where OpenRLHF's CUDA-only assumptions meet a CPU.

OpenRLHF's ``DeepspeedStrategy`` calls ``torch.cuda.set_device``, builds a "cuda"
device mesh, moves all_reduce/all_gather tensors to ``torch.cuda.current_device()``
and syncs CUDA after barriers; its log-prob helper runs a Triton kernel whenever
flash-attn imports. DeepSpeed itself trains ZeRO-3 on CPU with the gloo backend.
On a GPU everything below defers to OpenRLHF unchanged.
"""
from __future__ import annotations

import copy
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from csr_plugin.accelerator import enable_flash_attn_import

# OpenRLHF imports flash_attn at import time; its pure-Python install (no CUDA kernels, on CPU or on a
# GPU without a prebuilt flash-attn) imports only with the Triton backend selected. Must precede any
# openrlhf import.
enable_flash_attn_import()


def on_gpu() -> bool:
    return torch.cuda.is_available()


def comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def zero3_load_config(ds_config: dict) -> dict:
    """The DeepSpeed config a ZeRO-3 model loads under (transformers' HfDeepSpeedConfig -> zero.Init).

    The partitioned load gathers each module's parameters, lets rank 0 copy the checkpoint into them
    and broadcasts them. zero.Init reads its gather mode from this config: with the coalesced gather
    (see _gather_sequentially_on_cpu) a gloo gather could land after rank 0's copy and overwrite it
    (9 of 20 loads of the tiny VLM on 2 ranks had a tensor back at its init values or of garbage;
    sequential: 0 of 100). The strategy's configs already gather sequentially on CPU; this keeps the
    load exact whatever config a caller passes (a copy: the caller's is not changed).
    """
    return _gather_sequentially_on_cpu(copy.deepcopy(ds_config))


def fused_adam_buildable() -> bool:
    """Whether DeepSpeed's FusedAdam can run here: prebuilt at install (DS_BUILD_FUSED_ADAM=1, which
    scripts/setup_env.sh does where nvcc is), or an nvcc to compile it at first use. Where neither, the
    ranks train with torch's AdamW, said in each rank's log."""
    import logging
    import shutil

    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("fused_adam") or shutil.which("nvcc") or (
            os.environ.get("CUDA_HOME") and os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))):
        return True
    logging.getLogger(__name__).warning("DeepSpeed's FusedAdam is not prebuilt and there is no nvcc to build it: "
                                        "training with torch's AdamW (the same update; docs/install.md)")
    return False


def _barrier_and_sync() -> None:
    dist.barrier()
    if on_gpu():
        torch.cuda.synchronize()


def _install_cpu_safe_helpers() -> None:
    """Module-level OpenRLHF helpers that assume CUDA, made device-aware (idempotent)."""
    import openrlhf.models.actor as actor_module
    import openrlhf.utils.deepspeed.deepspeed as ds_module

    ds_module.torch_dist_barrier_and_cuda_sync = _barrier_and_sync
    original = actor_module.log_probs_from_logits
    if getattr(original, "_csr_device_aware", False):
        return

    def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
        if logits.is_cuda:
            return original(logits, labels, temperature)
        # flash-attn's Triton cross-entropy is CUDA-only: the same quantity, in chunks of rows
        if temperature != 1.0:
            logits = logits / temperature
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)

    log_probs_from_logits._csr_device_aware = True
    actor_module.log_probs_from_logits = log_probs_from_logits


def _gather_sequentially_on_cpu(config: dict) -> dict:
    """ZeRO-3's coalesced all-gather launches one async all-gather per parameter and waits on the last
    handle only, which orders them on a CUDA stream; gloo runs them on worker threads, so under load
    a parameter could be read before its gather landed: uninitialised memory in the gathered weights
    (a final/ tensor with values of 1e29 under a busy CI machine, and the same gather follows each
    optimizer step). The sequential gather waits on each one; on GPU nothing changes."""
    if not on_gpu():
        config.setdefault("zero_optimization", {})["stage3_allgather_sequential"] = True
    return config


def make_strategy(args):
    """OpenRLHF's DeepspeedStrategy, made to run unchanged on CPU (gloo) and GPU (NCCL): csr's DPO worker
    builds it in each rank; for PPO, OpenRLHF's driver builds it (ppo_on_cpu.py) and pickles it to its
    Ray actors, whose setup_distributed then installs the CPU helpers in that process."""
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    _install_cpu_safe_helpers()

    class DeviceAwareStrategy(DeepspeedStrategy):
        def setup_distributed(self, timeout=timedelta(minutes=60)) -> None:
            if on_gpu():
                return super().setup_distributed(timeout)
            _install_cpu_safe_helpers()  # in this process: a PPO rank is not the one that built the strategy
            import deepspeed
            import transformers
            from torch.distributed.device_mesh import init_device_mesh

            transformers.set_seed(self.seed)
            if getattr(self.args, "local_rank", -1) != -1:
                os.environ["LOCAL_RANK"] = str(self.args.local_rank)
            deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
            self.world_size = dist.get_world_size()
            dp_size = self.world_size // self.ring_attn_size // self.ds_tensor_parallel_size
            self.ds_device_mesh = init_device_mesh(
                "cpu", (dp_size, self.ring_attn_size, self.ds_tensor_parallel_size), mesh_dim_names=("dp", "sp", "tp"))
            self.setup_ring_attn(self.ds_device_mesh)
            self.accumulated_gradient = (self.train_batch_size * self.ring_attn_size * self.ds_tensor_parallel_size
                                         // self.micro_train_batch_size // self.world_size)

        def get_ds_train_config(self, optim_dict=None, *, max_norm=None):
            config = super().get_ds_train_config(optim_dict, max_norm=max_norm)
            if "optimizer" in config and (not on_gpu() or not fused_adam_buildable()):
                # DeepSpeed's FusedAdam is a CUDA kernel (its CPU build compiles C++ at start-up; on a GPU
                # it is compiled at first use, with nvcc, unless setup prebuilt it): plain torch AdamW is
                # the same update.
                config["optimizer"]["params"]["torch_adam"] = True
            return _gather_sequentially_on_cpu(config)

        def get_ds_eval_config(self, *args, **kwargs):
            return _gather_sequentially_on_cpu(super().get_ds_eval_config(*args, **kwargs))

        def all_reduce(self, data, op="mean"):
            if on_gpu():
                return super().all_reduce(data, op)
            if isinstance(data, dict):
                return {k: self.all_reduce(v, op) for k, v in data.items()}
            tensor = data.clone() if isinstance(data, torch.Tensor) else torch.tensor([float(data)])
            if op == "mean":
                tensor /= self.world_size
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            return tensor if isinstance(data, torch.Tensor) else tensor.item()

        def all_gather(self, data):
            if on_gpu():
                return super().all_gather(data)
            if isinstance(data, dict):
                return {k: self.all_gather(v) for k, v in data.items()}
            tensor = data if isinstance(data, torch.Tensor) else torch.tensor([float(data)])
            gathered = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(gathered, tensor)
            return torch.cat(gathered)

    # the fields OpenRLHF's own get_strategy reads
    return DeviceAwareStrategy(seed=getattr(args.train, "seed", 42),
                               max_norm=getattr(args, "max_norm", 1.0),
                               micro_train_batch_size=getattr(args.train, "micro_batch_size", 1),
                               train_batch_size=getattr(args.train, "batch_size", 128),
                               zero_stage=args.ds.zero_stage, args=args)
