"""A queue of projected features from past batches, for SwAV's codes with small batches.

SwAV (Caron et al. 2020), Sec. 4 and App. A.1 ("Working with small batches"): when the batch is much
smaller than the number of prototypes, the equipartition constraint over one batch is too strict, so
Sinkhorn-Knopp also sees the scores of stored features from past batches against the *current*
prototypes. Only the batch's codes are used for the loss. Like the reference (``queue`` in
facebookresearch/swav ``main_swav.py``), each rank keeps its own queue of ``length`` features per
global crop, newest first, and the queue takes part only once it is full (before that it would
feed empty slots to Sinkhorn-Knopp).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    """``length`` past features of dimension ``dim`` for each of ``n_views`` global crops.

    The features and the fill level are part of ``state_dict()`` (on every rank its own queue),
    so that a resumed run continues with exactly the queue it stopped with.
    """

    def __init__(self, n_views: int, length: int, dim: int):
        super().__init__()
        if n_views < 1 or length < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs n_views, length, dim >= 1; got {n_views}, {length}, {dim}")
        self.register_buffer("features", torch.zeros(n_views, length, dim))
        # A Python int, not a buffer, so that asking whether the queue is full never waits for the GPU.
        self.filled = 0

    @property
    def n_views(self) -> int:
        return self.features.shape[0]

    @property
    def length(self) -> int:
        return self.features.shape[1]

    @property
    def full(self) -> bool:
        return self.filled == self.length

    @torch.no_grad()
    def push(self, views: Sequence[Tensor]) -> None:
        """Prepend one (B, dim) feature batch per view; the oldest features drop out."""
        if len(views) != self.n_views:
            raise ValueError(f"FeatureQueue holds {self.n_views} views but was given {len(views)}")
        new = torch.stack([v.detach() for v in views]).to(self.features.dtype)
        self.features.copy_(torch.cat([new, self.features], dim=1)[:, : self.length])
        self.filled = min(self.length, self.filled + new.shape[1])

    @torch.no_grad()
    def scores(self, prototypes: Callable[[Tensor], Tensor]) -> list[Tensor] | None:
        """Scores of the stored features against the current prototypes, one (length, K) per view;
        None until the queue is full."""
        if not self.full:
            return None
        return [prototypes(f) for f in self.features]

    def get_extra_state(self) -> dict:
        return {"filled": self.filled}

    def set_extra_state(self, state: dict) -> None:
        self.filled = int(state["filled"])
