"""What the terms of the objective see of a step (``hybrid.HybridLoss`` builds it once per forward)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class LossInputs:
    embeddings: Sequence[Tensor] | None       # one (B, D) projected feature tensor per crop, global crops first
    scores: Sequence[Tensor] | None           # one (B, K) prototype-score tensor per crop
    queue_scores: Sequence[Tensor] | None     # one (L, K) tensor per global crop: queued features' scores
