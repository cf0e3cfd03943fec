"""The feature queue: newest-first order, fill level, scores once full, exact state_dict round trip."""

from __future__ import annotations

import io

import torch

from medssl.ssl import FeatureQueue


def batch(value: float, size: int = 2, dim: int = 3) -> torch.Tensor:
    return torch.full((size, dim), value) + torch.arange(size).unsqueeze(1) / 10


def test_push_prepends_and_drops_the_oldest():
    q = FeatureQueue(n_views=2, length=5, dim=3)
    q.push([batch(1), batch(-1)])
    q.push([batch(2), batch(-2)])
    assert q.filled == 4 and not q.full
    torch.testing.assert_close(q.features[0, :4], torch.cat([batch(2), batch(1)]))
    torch.testing.assert_close(q.features[1, :4], torch.cat([batch(-2), batch(-1)]))
    q.push([batch(3), batch(-3)])
    assert q.filled == 5 and q.full
    torch.testing.assert_close(q.features[0], torch.cat([batch(3), batch(2), batch(1)[:1]]))


def test_batch_longer_than_queue_keeps_its_first_rows():
    q = FeatureQueue(n_views=1, length=3, dim=3)
    q.push([batch(7, size=4)])
    assert q.full
    torch.testing.assert_close(q.features[0], batch(7, size=4)[:3])


def test_scores_only_when_full_and_against_given_prototypes():
    q = FeatureQueue(n_views=2, length=4, dim=3)
    prototypes = torch.nn.Linear(3, 5, bias=False)
    q.push([batch(1), batch(2)])
    assert q.scores(prototypes) is None
    q.push([batch(3), batch(4)])
    scores = q.scores(prototypes)
    assert len(scores) == 2 and scores[0].shape == (4, 5) and not scores[0].requires_grad
    torch.testing.assert_close(scores[1], prototypes(q.features[1]).detach())


def test_pushed_features_are_detached():
    q = FeatureQueue(n_views=1, length=2, dim=3)
    q.push([batch(1).requires_grad_()])
    assert not q.features.requires_grad


def test_state_dict_round_trip_resumes_exactly():
    a = FeatureQueue(n_views=2, length=6, dim=3)
    a.push([batch(1), batch(2)])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = FeatureQueue(n_views=2, length=6, dim=3)
    b.load_state_dict(torch.load(buffer))  # weights_only loading must accept the queue's state
    assert b.filled == a.filled == 2
    for q in (a, b):
        q.push([batch(3), batch(4)])
        q.push([batch(5), batch(6)])
    assert a.full and b.full
    torch.testing.assert_close(a.features, b.features, atol=0, rtol=0)
