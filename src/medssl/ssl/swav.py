"""The swapped-prediction loss of SwAV over multi-crop views.

SwAV (Caron et al. 2020), Eq. 1-2 with multi-crop (Sec. 3.2, Eq. 4): the codes q of each global crop,
computed by Sinkhorn-Knopp from its prototype scores, are predicted from every other crop through
p = softmax(scores / tau); the loss is the cross-entropy -sum_k q_k log p_k, averaged over samples,
over the other crops, and over the global crops. The averaging follows lightly's ``SwaVLoss`` and
facebookresearch/swav ``main_swav.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.config import PretrainConfig
from medssl.ssl.inputs import LossInputs
from medssl.ssl.sinkhorn import sinkhorn_knopp


class SwAVLoss(nn.Module):
    """Swapped prediction between ``n_global`` global crops (codes) and all crops (predictions).

    ``forward(scores, queue_scores)``: ``scores`` holds one (B, K) tensor of prototype scores
    (cosine similarities of normalised features and normalised prototypes) per crop, the global
    crops first. ``queue_scores``, if given, holds one (L, K) tensor per global crop: the scores of
    queued past features (``FeatureQueue.scores``), which join the batch in Sinkhorn-Knopp only.

    As a term of the hybrid objective (``hybrid.TERMS``): weighed by ``w_cluster``, made by
    ``from_config``, computed by ``term``.
    """

    weight_setting = "w_cluster"

    @classmethod
    def from_config(cls, cfg: PretrainConfig, n_global: int) -> SwAVLoss:
        return cls(n_global, cfg.temperature, cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations)

    def term(self, inputs: LossInputs) -> Tensor:
        if inputs.scores is None:
            raise ValueError("w_cluster > 0: the SwAV term needs the prototype scores of every crop")
        return self(inputs.scores, inputs.queue_scores)

    def __init__(
        self,
        n_global: int = 2,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        if n_global < 1:
            raise ValueError(f"SwAV needs at least one global crop to compute codes from, got n_global={n_global}")
        if temperature <= 0:
            raise ValueError(f"SwAV temperature must be > 0, got {temperature}")
        self.n_global = n_global
        self.temperature = temperature
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations

    def forward(self, scores: Sequence[Tensor], queue_scores: Sequence[Tensor] | None = None) -> Tensor:
        if len(scores) < max(2, self.n_global):
            raise ValueError(
                f"SwAV needs {self.n_global} global crops and at least 2 crops in all, got {len(scores)} crops"
            )
        if queue_scores is not None and len(queue_scores) != self.n_global:
            raise ValueError(
                f"queue_scores must hold one tensor per global crop ({self.n_global}), got {len(queue_scores)}"
            )
        # Scores from a bf16 autocast forward, divided by a temperature of ~0.1, are too coarse for
        # the cross-entropy, so it is computed in at least float32 (the codes already are).
        log_probs = [F.log_softmax(_at_least_float32(s) / self.temperature, dim=1) for s in scores]
        per_global = []
        for i in range(self.n_global):
            assign = scores[i].detach()
            if queue_scores is not None:
                assign = torch.cat([assign, queue_scores[i].detach()])
            # The queue's rows only shape the equipartition; the loss uses the batch's codes.
            codes = sinkhorn_knopp(assign, self.sinkhorn_epsilon, self.sinkhorn_iterations)[: scores[i].shape[0]]
            others = [v for v in range(len(scores)) if v != i]
            per_global.append(sum(-(codes * log_probs[v]).sum(dim=1).mean() for v in others) / len(others))
        return sum(per_global) / self.n_global


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
