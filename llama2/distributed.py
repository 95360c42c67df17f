"""Distributed training as one call: `setup()` and `apply_fsdp(model, ...)` (Llama 2 §2.2: FSDP).

The same recipe runs as `python -m llama2 <stage>` on one device and under `torchrun` on many:
`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), picks NCCL on GPUs and
gloo on CPUs, and returns a small `Dist` record. FSDP2 (`fully_shard`) is applied after the model
is built — model.py holds no distributed code — one block at a time, then the root (torchtitan).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Initialise the process group if launched by torchrun; choose this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world == 1:
        return Dist(device=dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    # Imported only when training runs on several ranks: torch.distributed's FSDP, device-mesh and
    # checkpoint modules take seconds to import, which every one-process run would pay.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world,))
    return Dist(rank, world, local, dev, mesh)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def apply_fsdp(model: torch.nn.Module, d: Dist, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard every transformer block, then the root (embeddings, final norm, output head).

    Mixed precision through FSDP2's policy: parameters cast to `param_dtype` for compute,
    gradients reduced in fp32 so that the optimizer sees full-precision averages.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # seconds to import: see setup()

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=d.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=d.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def all_reduce_mean(x: float | torch.Tensor, d: Dist) -> float:
    """Average a scalar over ranks (for logging)."""
    if not d.enabled:
        return float(x)
    t = torch.as_tensor(float(x), dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / d.world_size).item()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def full_state_dict(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The unsharded model weights on CPU (on every rank for world 1; rank 0 holds them under FSDP)."""
    if not d.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # see setup()

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
