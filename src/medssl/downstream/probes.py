"""Frozen-encoder evaluation, the protocols encoders are compared by (DINO, solo-learn, RAD-DINO):

- features of the un-augmented images, computed once per run (``frozen_features``);
- kNN (``knn_probabilities``): cosine similarity to the labeled training images, the ``k`` nearest vote
  with weight exp(similarity / temperature) (Wu et al. 2018, as DINO evaluates), and an output's
  probability is the weighted share of votes for it;
- the linear probe is ``training.py``'s ``linear`` mode on these features, its learning rate swept on
  validation (``sweep.py``).

Both need no augmentation and no backward pass through the encoder, so they are cheap enough to score
every saved checkpoint of a pretraining run (``medssl probe``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from medssl.config import FinetuneConfig
from medssl.downstream.images import to_input
from medssl.downstream.model import build_networks, resolve_device
from medssl.downstream.tasks import Task


@torch.no_grad()
def frozen_features(backbone: nn.Module, task: Task, ct_window: tuple[float, float], batch_size: int,
                    device: torch.device) -> Tensor:
    """(N, D) features of every task image, in row order, the encoder in eval mode (batch norm frozen)."""
    backbone.eval()
    out = []
    for i in range(0, len(task.images), batch_size):
        x = to_input(task.images[i:i + batch_size], task.is_ct[i:i + batch_size], ct_window)
        out.append(backbone(x.to(device)).float())
    return torch.cat(out)


def encoder_features(cfg: FinetuneConfig, task: Task) -> Tensor:
    """The features of ``cfg.init``'s encoder (run folder, weights file or scratch) for every task image."""
    device = resolve_device(cfg.device)
    backbone = build_networks(cfg, len(task.table.outputs)).classifier.backbone.to(device)
    return frozen_features(backbone, task, cfg.ct_window, cfg.eval_batch_size, device)


@torch.no_grad()
def knn_probabilities(bank: Tensor, bank_targets: Tensor, queries: Tensor, k: int, temperature: float,
                      batch_size: int = 1024) -> Tensor:
    """(Q, K) vote shares of the ``k`` nearest ``bank`` rows (cosine) for each query.

    ``bank_targets``: (B, K) 0/1 targets (one-hot for multi-class), so the shares are class probabilities
    for multi-class tasks and per-output probabilities for binary and multi-label ones.
    """
    bank = F.normalize(bank.float(), dim=1)
    targets = bank_targets.float()
    k = min(k, len(bank))
    out = []
    for i in range(0, len(queries), batch_size):
        sims = F.normalize(queries[i:i + batch_size].float(), dim=1) @ bank.T
        top, idx = sims.topk(k, dim=1)
        weights = ((top - top[:, :1]) / temperature).exp()  # shifted by the largest: no overflow at any T
        out.append((weights[:, :, None] * targets[idx]).sum(1) / weights.sum(1, keepdim=True))
    return torch.cat(out)
