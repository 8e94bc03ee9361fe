"""Process-group set-up from the environment (torchrun, submitit, or none) and the collectives MoCo uses.

With one process every collective is the identity, so the MoCo code has a single path for 1..N ranks.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str = "auto") -> torch.device:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun and
    submitit's TorchDistributedEnvironment set them) and return this rank's device.

    backend "auto": nccl when CUDA is available, gloo otherwise.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(minutes=30))
    return device


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 on CPU and on GPUs that support it, else fp16 (with a GradScaler)."""
    return torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0 (no gradient flows back), as in official MoCo."""
    if world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world_size()
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values
