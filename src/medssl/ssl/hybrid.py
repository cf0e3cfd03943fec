"""The hybrid objective of Ghesu et al. 2022: online clustering plus instance contrast.

Ghesu et al. 2022 ("Contrastive self-supervised learning from 100 million medical images with
optional supervision") combine SwAV's swapped prediction (online feature clustering over multi-crop
views) with an instance-contrastive InfoNCE term:
    L = w_cluster * L_swav + w_contrast * L_nce.
With w_contrast = 0 this is SwAV, with w_cluster = 0 it is SimCLR; a term whose weight is 0 is not
computed at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from medssl.config import PretrainConfig
from medssl.ssl.infonce import InfoNCELoss
from medssl.ssl.inputs import LossInputs
from medssl.ssl.queue import FeatureQueue
from medssl.ssl.swav import SwAVLoss

# The terms of the objective, by the name their values are logged under. A term is a module of its own
# with ``weight_setting`` (the PretrainConfig setting that weighs it), ``from_config(cfg, n_global)`` and
# ``term(LossInputs) -> Tensor``; adding one touches its file, its weight setting and this line.
TERMS: dict[str, type[nn.Module]] = {"swav": SwAVLoss, "infonce": InfoNCELoss}


class HybridLoss(nn.Module):
    """``forward(embeddings, scores, prototypes)`` -> (total loss, {term name: detached value}).

    ``embeddings``: one (B, D) projected feature tensor per crop, global crops first; InfoNCE is
    taken between the first two. ``scores``: one (B, K) prototype-score tensor per crop, for SwAV.
    ``prototypes``: the prototype layer (features -> scores), needed only with a ``queue``.
    ``terms``: name -> (weight, term module), of ``TERMS``; ``from_config`` makes them from a config.

    With a ``queue``, Sinkhorn-Knopp also sees the queued features' scores against the current
    prototypes once the queue is full. ``forward`` never changes the queue: the caller commits a
    step's global-crop embeddings with ``enqueue`` once the step is known to be finite, so that a
    skipped step's NaN features cannot enter it (they would make every later code NaN until pushed
    out). The queue is a submodule, so it is part of this module's ``state_dict()``; under DDP each
    rank has its own.
    """

    def __init__(self, terms: Mapping[str, tuple[float, nn.Module]], queue: FeatureQueue | None = None):
        super().__init__()
        weights = {name: float(w) for name, (w, _) in terms.items()}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"loss weights must be >= 0 and not all 0, got {weights}")
        swav = terms.get("swav", (0.0, None))
        if queue is not None and swav[0] <= 0:
            raise ValueError("a feature queue only serves the SwAV term, but w_cluster is 0")
        if queue is not None and queue.n_views != swav[1].n_global:
            raise ValueError(
                f"the feature queue holds {queue.n_views} views but there are {swav[1].n_global} global crops"
            )
        # Terms of weight 0 are not computed at all (w_contrast = 0 is SwAV, w_cluster = 0 SimCLR).
        self.weights = {name: w for name, w in weights.items() if w > 0}
        self.terms = nn.ModuleDict({name: module for name, (w, module) in terms.items() if w > 0})
        self.queue = queue

    @classmethod
    def from_config(cls, cfg: PretrainConfig, n_global: int, queue: FeatureQueue | None = None) -> HybridLoss:
        """The objective ``cfg`` describes: every term of ``TERMS`` whose weight setting is above 0."""
        terms = {name: (getattr(cfg, term.weight_setting), term.from_config(cfg, n_global))
                 for name, term in TERMS.items() if getattr(cfg, term.weight_setting) > 0}
        return cls(terms, queue)

    def forward(
        self,
        embeddings: Sequence[Tensor] | None,
        scores: Sequence[Tensor] | None = None,
        prototypes: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        queue_scores = None
        if self.queue is not None:
            if prototypes is None or embeddings is None:
                raise ValueError("with a feature queue, HybridLoss needs the embeddings and the prototype layer")
            # Scored before this batch is pushed: the batch must not be its own queue.
            queue_scores = self.queue.scores(prototypes)
        inputs = LossInputs(embeddings, scores, queue_scores)
        parts: dict[str, Tensor] = {}
        total = 0.0
        for name, term in self.terms.items():
            value = term.term(inputs)
            total = total + self.weights[name] * value
            parts[name] = value.detach()
        return total, parts

    def enqueue(self, embeddings: Sequence[Tensor]) -> None:
        """Push the global crops' embeddings of a step that was taken into the feature queue, if any."""
        if self.queue is not None:
            self.queue.push(embeddings[: self.queue.n_views])
