"""The hybrid objective: weighted sum of its parts, special cases, and the feature queue wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.config import PretrainConfig
from medssl.ssl import FeatureQueue, HybridLoss, InfoNCELoss, SwAVLoss

N_GLOBAL, N_LOCAL, BATCH, DIM, K = 2, 2, 6, 8, 10


def hybrid(n_global: int = N_GLOBAL, queue: FeatureQueue | None = None, **settings) -> HybridLoss:
    """The objective as pretraining builds it: from a config's settings (``HybridLoss.from_config``)."""
    return HybridLoss.from_config(PretrainConfig(**settings), n_global, queue)


def crops(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.nn.Module]:
    """Embeddings and prototype scores per crop, as the model produces them."""
    torch.manual_seed(seed)
    prototypes = torch.nn.Linear(DIM, K, bias=False)
    embeddings = [F.normalize(torch.randn(BATCH, DIM), dim=1).requires_grad_() for _ in range(N_GLOBAL + N_LOCAL)]
    return embeddings, [prototypes(e) for e in embeddings], prototypes


def test_total_is_weighted_sum_of_parts():
    embeddings, scores, _ = crops()
    total, parts = hybrid(w_cluster=0.7, w_contrast=0.3)(embeddings, scores)
    swav = SwAVLoss(N_GLOBAL)(scores)
    nce = InfoNCELoss()(embeddings[0], embeddings[1])
    torch.testing.assert_close(parts["swav"], swav.detach())
    torch.testing.assert_close(parts["infonce"], nce.detach())
    torch.testing.assert_close(total, 0.7 * swav + 0.3 * nce)
    assert total.requires_grad and not parts["swav"].requires_grad


def test_swav_only_does_not_need_embeddings():
    _, scores, _ = crops()
    total, parts = hybrid(w_cluster=1.0, w_contrast=0.0)(None, scores)
    assert set(parts) == {"swav"}
    torch.testing.assert_close(total, SwAVLoss(N_GLOBAL)(scores))


def test_simclr_only_does_not_need_scores():
    embeddings, _, _ = crops()
    total, parts = hybrid(w_cluster=0.0, w_contrast=2.0, nce_temperature=0.5)(embeddings)
    assert set(parts) == {"infonce"}
    torch.testing.assert_close(total, 2.0 * InfoNCELoss(0.5)(embeddings[0], embeddings[1]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"w_cluster": 0.0, "w_contrast": 0.0},
        {"w_cluster": -1.0},
        {"n_global": 1},
        {"w_cluster": 0.0, "queue": FeatureQueue(2, 4, DIM)},
        {"queue": FeatureQueue(3, 4, DIM)},
    ],
)
def test_rejects_inconsistent_settings(kwargs):
    with pytest.raises(ValueError):
        hybrid(**kwargs)


def test_queue_joins_sinkhorn_once_full_and_is_filled_by_enqueue():
    queue_length = 2 * BATCH
    loss = hybrid(w_contrast=0.0, queue=FeatureQueue(N_GLOBAL, queue_length, DIM))
    for step in range(2):  # fill the queue; no queue scores yet
        embeddings, scores, prototypes = crops(seed=step)
        total, _ = loss(embeddings, scores, prototypes)
        torch.testing.assert_close(total, SwAVLoss(N_GLOBAL)(scores))
        loss.enqueue(embeddings)
    assert loss.queue.full
    stored = loss.queue.features.clone()
    embeddings, scores, prototypes = crops(seed=2)
    total, _ = loss(embeddings, scores, prototypes)
    queue_scores = [prototypes(f).detach() for f in stored]  # the queue before this batch joined it
    torch.testing.assert_close(total, SwAVLoss(N_GLOBAL)(scores, queue_scores))
    loss.enqueue(embeddings)
    torch.testing.assert_close(loss.queue.features[:, :BATCH], torch.stack(embeddings[:N_GLOBAL]).detach())


def test_forward_leaves_the_queue_untouched_even_in_training_mode():
    """Only ``enqueue`` fills the queue: the loop commits a step's features once its loss is known finite."""
    loss = hybrid(queue=FeatureQueue(N_GLOBAL, BATCH, DIM)).train()
    embeddings, scores, prototypes = crops()
    loss([e * float("nan") for e in embeddings], scores, prototypes)
    assert loss.queue.filled == 0 and not loss.queue.features.any()


def test_queue_is_part_of_the_state_dict():
    loss = hybrid(queue=FeatureQueue(N_GLOBAL, BATCH, DIM))
    embeddings, scores, prototypes = crops()
    loss.enqueue(embeddings)
    restored = hybrid(queue=FeatureQueue(N_GLOBAL, BATCH, DIM))
    restored.load_state_dict(loss.state_dict())
    assert restored.queue.full
    torch.testing.assert_close(restored.queue.features, loss.queue.features, atol=0, rtol=0)
