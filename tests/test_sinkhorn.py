"""Sinkhorn-Knopp codes against lightly's implementation of the SwAV reference, and their marginals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

from medssl.ssl import sinkhorn_knopp


def cosine_scores(batch: int, prototypes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Scores as the model produces them: normalised features against normalised prototypes."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return z @ c.t()


@pytest.mark.parametrize("batch,prototypes", [(32, 50), (64, 10), (7, 300)])
@pytest.mark.parametrize("epsilon,iterations", [(0.05, 3), (0.03, 3), (0.05, 1), (0.1, 10)])
def test_codes_equal_lightly(batch, prototypes, epsilon, iterations):
    scores = cosine_scores(batch, prototypes, seed=batch + prototypes)
    ours = sinkhorn_knopp(scores, epsilon=epsilon, iterations=iterations)
    theirs = lightly_sinkhorn(scores, iterations=iterations, epsilon=epsilon)
    assert ours.shape == (batch, prototypes)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_each_sample_codes_sum_to_one():
    codes = sinkhorn_knopp(cosine_scores(40, 30))
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(40), atol=1e-5, rtol=0)
    assert (codes >= 0).all()


def test_converges_to_equipartition_over_prototypes():
    """With enough iterations every prototype receives B / K of the batch's mass (Eq. 3's polytope)."""
    batch, prototypes = 60, 12
    scores = cosine_scores(batch, prototypes)
    few = sinkhorn_knopp(scores, iterations=1).sum(dim=0)
    many = sinkhorn_knopp(scores, iterations=200).sum(dim=0)
    target = torch.full((prototypes,), batch / prototypes)
    torch.testing.assert_close(many, target, atol=1e-3, rtol=0)
    assert (few - target).abs().max() > 10 * (many - target).abs().max()


def test_permuting_samples_permutes_codes():
    """Sinkhorn is equivariant in the samples, which is why queue order and rank order do not matter."""
    scores = cosine_scores(24, 16)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sinkhorn_knopp(scores[perm]), sinkhorn_knopp(scores)[perm], atol=1e-6, rtol=0)


def test_small_epsilon_stays_finite_and_exact():
    """exp(score / 0.005) overflows float32 in the reference; ours equals the float64 reference."""
    scores = cosine_scores(32, 20)
    ours = sinkhorn_knopp(scores, epsilon=0.005)
    assert not torch.isfinite(lightly_sinkhorn(scores, epsilon=0.005)).all()
    exact = lightly_sinkhorn(scores.double(), epsilon=0.005).float()
    torch.testing.assert_close(ours, exact, atol=1e-5, rtol=0)


def test_no_gradient_and_float32_from_bf16():
    scores = cosine_scores(16, 8).bfloat16().requires_grad_()
    codes = sinkhorn_knopp(scores)
    assert codes.dtype == torch.float32 and not codes.requires_grad
    torch.testing.assert_close(codes, sinkhorn_knopp(scores.detach().float()), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", [{"epsilon": 0.0}, {"iterations": 0}])
def test_rejects_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        sinkhorn_knopp(cosine_scores(4, 3), **kwargs)
