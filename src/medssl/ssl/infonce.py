"""The instance-contrastive InfoNCE loss between two views (NT-Xent).

SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"),
Eq. 1: for a positive pair (i, j) of views of one image,
    l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau),
with sim the cosine similarity, averaged over both orderings of every pair. The 2N - 2 negatives of
an anchor are all other views in the batch; under DDP the batch is the one concatenated over ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.config import PretrainConfig
from medssl.distributed import all_gather_with_grad, rank, world_size
from medssl.ssl.inputs import LossInputs


class InfoNCELoss(nn.Module):
    """NT-Xent between two views' embeddings ``z0``, ``z1`` (B, D), with temperature ``temperature``.

    Under ``torch.distributed`` the candidates (positives and negatives) are gathered from every rank
    with a gradient-correct all-gather, while the anchors are this rank's 2B embeddings: the loss is
    the mean over local anchors, so the mean of the ranks' losses (and, with DDP's gradient
    averaging, the gradients) equals the single-process loss over the concatenated batch.

    As a term of the hybrid objective (``hybrid.TERMS``): weighed by ``w_contrast``, made by
    ``from_config``, computed by ``term`` between the first two global crops.
    """

    weight_setting = "w_contrast"

    @classmethod
    def from_config(cls, cfg: PretrainConfig, n_global: int) -> InfoNCELoss:
        if n_global < 2:
            raise ValueError(f"the InfoNCE term needs two global crops, got n_global={n_global}")
        return cls(cfg.nce_temperature)

    def term(self, inputs: LossInputs) -> Tensor:
        if inputs.embeddings is None or len(inputs.embeddings) < 2:
            raise ValueError("w_contrast > 0: the InfoNCE term needs the embeddings of at least two global crops")
        return self(inputs.embeddings[0], inputs.embeddings[1])

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"InfoNCE temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        if z0.shape != z1.shape or z0.dim() != 2:
            raise ValueError(
                "InfoNCE needs two (B, D) embeddings of the same shape, "
                f"got {tuple(z0.shape)} and {tuple(z1.shape)}"
            )
        # Logits are cosine similarities over a temperature of ~0.1: too coarse in bf16.
        with torch.autocast(device_type=z0.device.type, enabled=False):
            dtype = torch.promote_types(z0.dtype, torch.float32)
            z0 = F.normalize(z0.to(dtype), dim=1)
            z1 = F.normalize(z1.to(dtype), dim=1)
            batch = z0.shape[0]
            n = batch * world_size()
            # Candidates in global order: view 0 of all ranks, then view 1 of all ranks.
            candidates = torch.cat([all_gather_with_grad(z0), all_gather_with_grad(z1)])
            logits = torch.cat([z0, z1]) @ candidates.t() / self.temperature  # (2B, 2N)
            local = rank() * batch + torch.arange(batch, device=z0.device)
            own = torch.cat([local, local + n])
            positive = torch.cat([local + n, local])
            anchors = torch.arange(2 * batch, device=z0.device)
            # An embedding is not its own negative.
            self_mask = torch.zeros_like(logits, dtype=torch.bool)
            self_mask[anchors, own] = True
            logits = logits.masked_fill(self_mask, float("-inf"))
            return F.cross_entropy(logits, positive)
