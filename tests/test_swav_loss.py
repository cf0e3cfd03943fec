"""The swapped-prediction loss against lightly's SwaVLoss: values, gradients, queue scores, bf16 inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import SwaVLoss

from medssl.ssl import SwAVLoss


def crop_scores(n_crops: int, batch: int = 16, prototypes: int = 30, dim: int = 12, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return [(F.normalize(torch.randn(batch, dim, generator=g), dim=1) @ c.t()).requires_grad_() for _ in range(n_crops)]


@pytest.mark.parametrize(
    "n_global,n_local,temperature,epsilon,iterations",
    [(2, 4, 0.1, 0.05, 3), (2, 0, 0.1, 0.05, 3), (2, 6, 0.2, 0.03, 5), (3, 2, 0.1, 0.05, 1)],
)
def test_loss_and_gradients_equal_lightly(n_global, n_local, temperature, epsilon, iterations):
    ours_in = crop_scores(n_global + n_local, seed=n_local)
    theirs_in = [s.detach().clone().requires_grad_() for s in ours_in]
    ours = SwAVLoss(n_global, temperature, epsilon, iterations)(ours_in)
    theirs = SwaVLoss(temperature, iterations, epsilon)(theirs_in[:n_global], theirs_in[n_global:])
    assert ours.dim() == 0  # lightly returns shape (1,)
    torch.testing.assert_close(ours, theirs.squeeze(0), atol=1e-5, rtol=0)
    ours.backward()
    theirs.backward()
    for a, b in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


def test_queue_scores_equal_lightly():
    scores = crop_scores(6, batch=8, prototypes=40)
    queue_scores = [s.detach() for s in crop_scores(2, batch=24, prototypes=40, seed=5)]
    ours = SwAVLoss(n_global=2)(scores, queue_scores)
    theirs = SwaVLoss()(scores[:2], scores[2:], queue_outputs=queue_scores)
    torch.testing.assert_close(ours, theirs.squeeze(0), atol=1e-5, rtol=0)
    # The queue must change the codes, or this test would not show that it is used.
    assert (ours - SwAVLoss(n_global=2)(scores)).abs() > 1e-4


def test_bf16_scores_are_computed_in_float32():
    """bf16 scores (from an autocast forward) give the loss of the same values in float32."""
    scores = [s.detach().bfloat16() for s in crop_scores(4)]
    loss = SwAVLoss()([s.requires_grad_() for s in scores])
    expected = SwaVLoss()([s.float() for s in scores[:2]], [s.float() for s in scores[2:]]).squeeze(0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_crops,n_global,n_queue", [(1, 1, None), (3, 4, None), (4, 2, 1)])
def test_rejects_inconsistent_inputs(n_crops, n_global, n_queue):
    queue = None if n_queue is None else [torch.zeros(5, 30)] * n_queue
    with pytest.raises(ValueError):
        SwAVLoss(n_global=n_global)(crop_scores(n_crops), queue)
