"""Heads on top of the backbone: the projection MLP and the prototypes of online clustering (SwAV)."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    """Linear-BN-ReLU-Linear, the projection MLP of SimCLR/SwAV (Caron et al. 2020, sec. 4.1)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class Prototypes(nn.Linear):
    """K trainable prototype vectors; forward gives the scores z @ c_k (Caron et al. 2020, eq. 2).

    The rows are kept on the unit sphere the way the SwAV reference does it: ``normalize_()``
    rescales the weight in place, under no_grad, at the start of every training step, and the
    gradient step then moves the raw rows. We follow the reference rather than normalising inside
    forward because the two differ in training dynamics: a normalisation in forward projects the
    gradient onto the sphere's tangent and lets weight decay shrink the raw norm, which raises the
    effective learning rate of the prototypes over time (and LARS sees other norms). The weight is
    normalised at construction, so the first step and any forward before training are on the sphere.
    """

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__(dim, n_prototypes, bias=False)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(nn.functional.normalize(self.weight, dim=1, p=2))
