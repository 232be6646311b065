"""Thin helpers over torch.distributed that are no-ops in a single process.

Launch with `torchrun --nproc_per_node N ...` (add `--nnodes/--node_rank/--master_addr` for several machines):
torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and `init_distributed` reads them.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Join the process group torchrun describes; returns (rank, world_size, local_rank).

    A no-op returning (0, 1, 0) when WORLD_SIZE is unset or 1. `backend` defaults to "nccl" when CUDA is
    available, else "gloo"; with nccl the process's CUDA device is set to LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all processes (a new tensor; the input is left alone)."""
    if not is_distributed():
        return tensor.clone()
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's `obj`, indexed by rank (pickled: only for our own, trusted objects)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from process `src`, on every process."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wants_sync_batchnorm(model_cfg: Any) -> bool:
    """Whether any `norm` field of a model config (backbone, neck, heads) is "syncbn". Such layers are plain
    BatchNorm in one process; the trainer converts every BatchNorm of the model to torch.nn.SyncBatchNorm when it
    trains under DDP, before wrapping it (statistics over the global batch; SyncBatchNorm needs CUDA)."""
    if isinstance(model_cfg, dict):
        values = model_cfg
    elif hasattr(model_cfg, "__dataclass_fields__"):
        values = {name: getattr(model_cfg, name) for name in model_cfg.__dataclass_fields__}
    else:
        return False
    return any((key == "norm" and value == "syncbn") or wants_sync_batchnorm(value) for key, value in values.items())
