"""Process groups and collectives: ``torchrun`` set-up, and collectives that are identities in one process.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them we run as a world of one and never
initialise a process group, so the same code path serves a laptop and a cluster. The losses call the
collectives whenever ``torch.distributed`` is initialised, so every rank of a DDP job must call a loss
in the same order with batches of the same size (as DDP training does anyway).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def all_reduce_(tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce without gradient (for Sinkhorn's marginals)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order.

    Unlike ``dist.all_gather``, gradients flow back: each rank receives the sum, over all ranks'
    losses, of the gradient with respect to its own slice. With DDP's gradient averaging this gives
    exactly the gradient of the single-process loss over the concatenated batch.
    """
    if world_size() == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise from torchrun's environment: nccl on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean over ranks (for logging losses that every rank computed on its own batch)."""
    return all_reduce_(value.clone()) / world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (RNG states and queues for a checkpoint)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
