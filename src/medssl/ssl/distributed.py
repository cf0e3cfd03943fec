"""The collectives the objective needs, which reduce to identities in a single process.

The losses call these whenever ``torch.distributed`` is initialised, so every rank of a DDP job must
call a loss in the same order with batches of the same size (as DDP training does anyway).
"""

from __future__ import annotations

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
