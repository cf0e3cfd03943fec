"""InfoNCE (NT-Xent) against a direct computation of SimCLR's Eq. 1, gradients, and bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import NTXentLoss

from medssl.ssl import InfoNCELoss


def views(batch: int = 8, dim: int = 16, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, dim, generator=g, dtype=dtype)
    z1 = z0 + 0.5 * torch.randn(batch, dim, generator=g, dtype=dtype)  # correlated, like two views
    return z0, z1


def nt_xent_by_loops(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> float:
    """Eq. 1 of SimCLR over the 2N views [z0; z1], anchor by anchor, in float64."""
    z = [v.double() / v.double().norm() for v in torch.cat([z0, z1])]
    n = len(z0)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(float(z[i] @ z[positive]) / temperature)
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("batch", [2, 8])
def test_equals_direct_computation(temperature, batch):
    z0, z1 = views(batch=batch, seed=batch)
    loss = InfoNCELoss(temperature)(z0, z1)
    assert loss.dim() == 0
    assert abs(loss.item() - nt_xent_by_loops(z0, z1, temperature)) < 1e-5


def test_equals_lightly_ntxent():
    z0, z1 = views(batch=16)
    torch.testing.assert_close(InfoNCELoss(0.2)(z0, z1), NTXentLoss(temperature=0.2)(z0, z1), atol=1e-5, rtol=0)


def test_gradcheck():
    z0, z1 = views(batch=4, dim=5, dtype=torch.float64)
    loss = InfoNCELoss(0.3)
    assert torch.autograd.gradcheck(loss, (z0.requires_grad_(), z1.requires_grad_()))


def test_invariant_to_embedding_scale():
    """Eq. 1 uses cosine similarity, so rescaling an embedding must not change the loss."""
    z0, z1 = views()
    scale = torch.linspace(0.5, 4.0, len(z0)).unsqueeze(1)
    torch.testing.assert_close(InfoNCELoss()(z0 * scale, z1), InfoNCELoss()(z0, z1), atol=1e-6, rtol=0)


def test_matching_views_give_lower_loss_than_shuffled():
    z0, z1 = views(batch=16)
    loss = InfoNCELoss()
    assert loss(z0, z1) < loss(z0, z1.roll(1, dims=0)) - 1.0


def test_computed_in_float32_under_bf16_autocast():
    z0, z1 = views(batch=16, dim=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = InfoNCELoss()(z0, z1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - nt_xent_by_loops(z0, z1, 0.1)) < 1e-5


def test_rejects_mismatched_views():
    with pytest.raises(ValueError):
        InfoNCELoss()(torch.randn(4, 8), torch.randn(5, 8))
