"""OpenRLHF's PPO (``train_ppo_ray``) on a machine without CUDA: the few places it assumes a GPU, each
replaced where it is used, nothing else changed (no fork).

In the driver (``install_driver``, before ``train_ppo_ray`` runs):

* ``get_strategy`` builds csr's ``DeviceAwareStrategy`` (training/device.py, the layer the DPO worker
  already trains with: gloo, a CPU device mesh, torch's AdamW). It is pickled to every trainer actor.
* ``create_vllm_engines`` starts ``CpuRolloutActor``: OpenRLHF's ``RolloutRayActor`` with vLLM's CPU
  engine arguments, the recipe's ``trust_remote_code`` (OpenRLHF hard-codes True) and ``CpuWorkerWrap``
  as the vLLM worker extension (OpenRLHF's ``WorkerWrap`` receives weights into a "cuda" tensor over
  NCCL); after each weight sync it resets vLLM's encoder cache.
* Ray runs with a declared "GPU" resource, so OpenRLHF's GPU bundles and ``num_gpus`` actors schedule;
  no process ever asks torch for a GPU (``ray_resources``).

In every Ray worker of the job (``setup_hook``, Ray's ``worker_process_setup_hook``; ``CSR_CPU_PPO=1``):

* ``torch.cuda.current_device`` / ``synchronize`` / ``current_stream`` answer for the CPU. On a torch
  without CUDA they can only raise, and OpenRLHF's actors call them for a device to move tensors to and
  for barriers (launcher.py, ppo_actor.py, replay_buffer.py, distributed_util.py).
* ``NaiveReplayBuffer`` keeps experiences on the CPU (it builds ``f"cuda:{current_device()}"``).
* ``stateless_init_process_group`` (the weight-sync group between DeepSpeed rank 0 and the vLLM
  workers) is a gloo group: OpenRLHF's is vLLM's PyNccl communicator whatever ``--vllm.sync_backend``
  says.

The vLLM engine core runs in a process vLLM spawns, which Ray's hook never reaches; ``CpuWorkerWrap`` gets
there because vLLM imports the worker extension by name.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

ENV_VAR = "CSR_CPU_PPO"
HOOK = "csr_plugin.openrlhf.ppo_on_cpu.setup_hook"
WORKER_EXTENSION = "csr_plugin.openrlhf.ppo_on_cpu.CpuWorkerWrap"
SYNC_TIMEOUT = timedelta(minutes=30)


def ray_resources(ppo) -> dict:
    """Logical resources of the local Ray cluster: one declared GPU per bundle OpenRLHF asks for (actor,
    reference, vLLM engines), and a CPU slot for each of them and the trainer actor. They are slots, not
    cores: the processes share the machine's cores."""
    ranks = ppo.nodes * ppo.gpus_per_node
    gpus = 2 * ranks + ppo.vllm_engines * ppo.vllm_tp
    return {"num_gpus": gpus, "num_cpus": gpus + 2}


def worker_env() -> dict[str, str]:
    """Environment of every Ray worker of a CPU PPO run."""
    from csr_plugin.sampling.vllm_engine import cpu_openrlhf_env

    return {ENV_VAR: "1", **cpu_openrlhf_env()}


# ── driver ──

def install_driver(recipe) -> None:
    """Point train_ppo_ray's strategy and vLLM actors at their CPU versions (this process only)."""
    import openrlhf.trainer.ray.vllm_engine as vllm_engine
    import openrlhf.utils as openrlhf_utils

    from csr_plugin.training.device import make_strategy

    openrlhf_utils.get_strategy = make_strategy  # train_ppo_ray imports the name when it runs
    vllm_engine.RolloutRayActor = _cpu_rollout_actor(recipe)


def _cpu_rollout_actor(recipe):
    import ray
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

    from csr_plugin.sampling.vllm_engine import engine_args

    cpu_args = engine_args(recipe.search, cpu=True)
    trust_remote_code = recipe.model.trust_remote_code

    class CpuRolloutActor(RolloutRayActor.__ray_actor_class__):
        async def __init__(self, *args, **kwargs):
            kwargs.update(cpu_args, worker_extension_cls=WORKER_EXTENSION, trust_remote_code=trust_remote_code)
            kwargs.pop("gpu_memory_utilization", None)  # a GPU fraction; the CPU KV cache is sized in bytes
            await super().__init__(*args, **kwargs)

        async def update_weight(self, name, dtype, shape, empty_cache=False):
            await super().update_weight(name, dtype, shape, empty_cache)
            if empty_cache:
                # The sync's last parameter: CpuWorkerWrap has reloaded the weights, which empties the
                # worker's encoder cache; the scheduler's record of it must go too, or the next prompt
                # with an image seen before is scheduled without its encoder pass ("Encoder cache
                # miss"). Embeddings made with the old projector are stale anyway.
                await self.llm.reset_encoder_cache()

    return ray.remote(CpuRolloutActor)


# ── Ray workers ──

def setup_hook() -> None:
    """Ray ``worker_process_setup_hook`` of a PPO run: the step-wise reward patch (when asked for) and,
    with ``CSR_CPU_PPO=1``, the CPU stand-ins."""
    from csr_plugin.openrlhf import dense_rewards

    dense_rewards.setup_hook()
    if os.environ.get(ENV_VAR) == "1":
        install_worker()


def install_worker() -> None:
    """The CPU stand-ins in this process (idempotent)."""
    import torch

    if torch.cuda.is_available() or getattr(torch.cuda, "_csr_cpu", False):
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: None
    torch.cuda._csr_cpu = True

    import openrlhf.trainer.ppo_utils.replay_buffer as replay_buffer
    import openrlhf.utils.distributed_util as distributed_util

    buffer = replay_buffer.NaiveReplayBuffer
    original_init = buffer.__init__

    def __init__(self, *args, **kwargs):
        with _cuda_index_zero(torch):  # it builds torch.device(f"cuda:{current_device()}")
            original_init(self, *args, **kwargs)
        self.target_device = torch.device("cpu")

    buffer.__init__ = __init__
    # ppo_actor imports the name; patching the source module first also covers a later import
    distributed_util.stateless_init_process_group = gloo_group
    import openrlhf.trainer.ray.ppo_actor as ppo_actor

    ppo_actor.stateless_init_process_group = gloo_group


@contextlib.contextmanager
def _cuda_index_zero(torch):
    patched = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = patched


# ── weight sync ──

class GlooBroadcastGroup:
    """A gloo process group of its own (the trainer's default group and vLLM's are untouched), with the
    ``broadcast(tensor, src, stream)`` call OpenRLHF makes on its PyNccl communicator."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        import torch.distributed as dist

        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=SYNC_TIMEOUT)
        self.group = dist.ProcessGroupGloo(store, rank, world_size, SYNC_TIMEOUT)

    def broadcast(self, tensor, src: int = 0, stream=None) -> None:
        self.group.broadcast(tensor, src).wait()


def gloo_group(master_address, master_port, rank, world_size, device=None) -> GlooBroadcastGroup:
    """stateless_init_process_group's signature; ``device`` is the CPU here."""
    return GlooBroadcastGroup(master_address, master_port, rank, world_size)


def _worker_wrap():
    from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap

    return WorkerWrap


class CpuWorkerWrap(_worker_wrap()):
    """OpenRLHF's vLLM worker extension, receiving weights into CPU tensors over gloo."""

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name,
                           backend="gloo", use_ray=False):
        import torch

        rank = torch.distributed.get_rank() + rank_offset
        self._model_update_with_ray = False
        self._model_update_group = gloo_group(master_address, master_port, rank, world_size)

    def update_weight(self, name, dtype, shape, empty_cache=False):
        """Receive one parameter; at the sync's last one (OpenRLHF sets ``empty_cache`` there, and only
        there) reload them all through vLLM's layerwise reload. vLLM's CPU kernels repack weights after
        loading, so a parameter cannot take a checkpoint tensor on its own: the reload restores each
        layer's checkpoint layout, loads, and repacks, and a layer that got nothing (the frozen vision
        tower) keeps its weights."""
        import torch

        if dtype != self.model_config.dtype:
            raise TypeError(f"weight sync: {name} arrives as {dtype}, the vLLM engine holds "
                            f"{self.model_config.dtype}")
        weight = torch.empty(shape, dtype=dtype, device=self.device)
        self._model_update_group.broadcast(weight, src=0)
        pending = self.__dict__.setdefault("_csr_pending_weights", [])
        pending.append((name, weight))
        if empty_cache:
            self._csr_pending_weights = []
            self.model_runner.reload_weights(weights_iterator=pending)
