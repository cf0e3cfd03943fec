"""The pretraining network: backbone -> projection -> L2-normalised embedding -> prototype scores."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from medssl.models.backbone import create_backbone
from medssl.models.heads import ProjectionHead, Prototypes


def _same_size_runs(crops: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive crops of one spatial size, in order (e.g. [2 global], [6 local])."""
    runs: list[list[Tensor]] = []
    for crop in crops:
        if runs and runs[-1][0].shape[-2:] == crop.shape[-2:]:
            runs[-1].append(crop)
        else:
            runs.append([crop])
    return runs


class SSLModel(nn.Module):
    """Backbone, projection head and prototypes of the hybrid objective (Ghesu et al. 2022).

    ``forward`` follows SwAV's multi-crop forward: crops of one resolution go through the backbone
    as one batch (fewer, larger kernels), and the head sees all crops at once so that its batch
    norm statistics cover every view. ``channels_last`` converts the weights here and the inputs in
    forward, which makes convolutions faster with bf16 autocast on CPU and on tensor-core GPUs.
    """

    def __init__(self, backbone_name: str, proj_hidden: int = 2048, proj_dim: int = 128,
                 n_prototypes: int = 3000, in_chans: int = 1, channels_last: bool = False):
        super().__init__()
        self.backbone, self.feature_dim = create_backbone(backbone_name, in_chans)
        self.projection = ProjectionHead(self.feature_dim, proj_hidden, proj_dim)
        self.prototypes = Prototypes(proj_dim, n_prototypes)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def normalize_prototypes(self) -> None:
        """Put the prototypes back on the unit sphere; call once per step before forward."""
        self.prototypes.normalize_()

    def forward(self, crops: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """crops: tensors (B, C, h, w), one per view, all with the same B.

        Returns per crop the embeddings (B, proj_dim), unit L2 norm, and the prototype scores
        (B, n_prototypes), in the order of ``crops``.
        """
        batch = crops[0].shape[0]
        if any(c.shape[0] != batch for c in crops):
            raise ValueError(f"all crops need the same batch size, got {[c.shape[0] for c in crops]}")
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        features = [self.backbone(torch.cat(run).contiguous(memory_format=memory_format))
                    for run in _same_size_runs(crops)]
        z = F.normalize(self.projection(torch.cat(features)), dim=1)
        scores = self.prototypes(z)
        return list(z.split(batch)), list(scores.split(batch))
