"""The hybrid objective of Ghesu et al. 2022: online clustering plus instance contrast.

Ghesu et al. 2022 ("Contrastive self-supervised learning from 100 million medical images with
optional supervision") combine SwAV's swapped prediction (online feature clustering over multi-crop
views) with an instance-contrastive InfoNCE term:
    L = w_cluster * L_swav + w_contrast * L_nce.
With w_contrast = 0 this is SwAV, with w_cluster = 0 it is SimCLR; a term whose weight is 0 is not
computed at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from medssl.ssl.infonce import InfoNCELoss
from medssl.ssl.queue import FeatureQueue
from medssl.ssl.swav import SwAVLoss


class HybridLoss(nn.Module):
    """``forward(embeddings, scores, prototypes)`` -> (total loss, {term name: detached value}).

    ``embeddings``: one (B, D) projected feature tensor per crop, global crops first; InfoNCE is
    taken between the first two. ``scores``: one (B, K) prototype-score tensor per crop, for SwAV.
    ``prototypes``: the prototype layer (features -> scores), needed only with a ``queue``.

    With a ``queue``, Sinkhorn-Knopp also sees the queued features' scores against the current
    prototypes once the queue is full. ``forward`` never changes the queue: the caller commits a
    step's global-crop embeddings with ``enqueue`` once the step is known to be finite, so that a
    skipped step's NaN features cannot enter it (they would make every later code NaN until pushed
    out). The queue is a submodule, so it is part of this module's ``state_dict()``; under DDP each
    rank has its own.
    """

    def __init__(
        self,
        w_cluster: float = 1.0,
        w_contrast: float = 1.0,
        n_global: int = 2,
        swav_temperature: float = 0.1,
        nce_temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue: FeatureQueue | None = None,
    ):
        super().__init__()
        if w_cluster < 0 or w_contrast < 0 or w_cluster + w_contrast == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got w_cluster={w_cluster}, w_contrast={w_contrast}"
            )
        if w_contrast > 0 and n_global < 2:
            raise ValueError(f"the InfoNCE term needs two global crops, got n_global={n_global}")
        if queue is not None and w_cluster == 0:
            raise ValueError("a feature queue only serves the SwAV term, but w_cluster is 0")
        if queue is not None and queue.n_views != n_global:
            raise ValueError(
                f"the feature queue holds {queue.n_views} views but there are {n_global} global crops"
            )
        self.w_cluster = w_cluster
        self.w_contrast = w_contrast
        self.swav = None
        if w_cluster > 0:
            self.swav = SwAVLoss(n_global, swav_temperature, sinkhorn_epsilon, sinkhorn_iterations)
        self.infonce = InfoNCELoss(nce_temperature) if w_contrast > 0 else None
        self.queue = queue

    def forward(
        self,
        embeddings: Sequence[Tensor] | None,
        scores: Sequence[Tensor] | None = None,
        prototypes: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        total = 0.0
        if self.swav is not None:
            if scores is None:
                raise ValueError("w_cluster > 0: HybridLoss needs the prototype scores of every crop")
            queue_scores = None
            if self.queue is not None:
                if prototypes is None or embeddings is None:
                    raise ValueError("with a feature queue, HybridLoss needs the embeddings and the prototype layer")
                # Scored before this batch is pushed: the batch must not be its own queue.
                queue_scores = self.queue.scores(prototypes)
            swav = self.swav(scores, queue_scores)
            total = total + self.w_cluster * swav
            parts["swav"] = swav.detach()
        if self.infonce is not None:
            if embeddings is None or len(embeddings) < 2:
                raise ValueError("w_contrast > 0: HybridLoss needs the embeddings of at least two global crops")
            nce = self.infonce(embeddings[0], embeddings[1])
            total = total + self.w_contrast * nce
            parts["infonce"] = nce.detach()
        return total, parts

    def enqueue(self, embeddings: Sequence[Tensor]) -> None:
        """Push the global crops' embeddings of a step that was taken into the feature queue, if any."""
        if self.queue is not None:
            self.queue.push(embeddings[: self.queue.n_views])
