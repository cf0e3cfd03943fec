"""Task kinds: what makes a binary, a multi-class and a multi-label task differ once its CSV is read.

Every kind has K outputs with 0/1 targets (``tasks.read_task_csv`` decides the kind and the outputs); the
kind says how logits become a loss and probabilities, what its accuracy is, and which classes a row counts
toward when splits and label subsets are stratified. Everything else (training loop, AUC, bootstrap,
records) is shared. Adding a kind: a ``TaskKind`` here, a line in ``KINDS``, and the CSV rule that picks it in
``tasks.read_task_csv``; a kind whose targets are not K per image (segmentation masks) also brings its own
targets, metric and reader, and keeps the contract keys of ``artifacts.DownstreamMetrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class TaskKind:
    name: str
    loss: Callable[[Tensor, Tensor], Tensor]                 # logits (N, K), targets (N, K) -> scalar
    probabilities: Callable[[Tensor], Tensor]                # logits (N, K) -> (N, K)
    accuracy: Callable[[np.ndarray, np.ndarray], float] | None   # (targets, probs); None: no single number
    strata: Callable[[np.ndarray], np.ndarray]               # targets (N, K) -> (N, S) 0/1


def _sigmoid_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets)


def _softmax_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets.argmax(1))


KINDS: dict[str, TaskKind] = {k.name: k for k in (
    TaskKind("binary", _sigmoid_loss, Tensor.sigmoid,
             lambda targets, probs: float(np.mean((probs[:, 0] >= 0.5) == (targets[:, 0] == 1))),  # threshold 0.5
             lambda targets: np.concatenate([1 - targets, targets], axis=1)),
    TaskKind("multiclass", _softmax_loss, lambda logits: logits.softmax(1),
             lambda targets, probs: float(np.mean(probs.argmax(1) == targets.argmax(1))),  # arg-max
             lambda targets: targets),
    # Rows without any label form a stratum of their own.
    TaskKind("multilabel", _sigmoid_loss, Tensor.sigmoid, None,
             lambda targets: np.concatenate([targets, (targets.sum(1, keepdims=True) == 0)], axis=1)),
)}


def accuracy(kind: str, targets: np.ndarray, probs: np.ndarray) -> float | None:
    """The kind's accuracy; None where it has none (multi-label) and for non-finite probabilities."""
    measure = KINDS[kind].accuracy
    return None if measure is None or not np.isfinite(probs).all() else measure(targets, probs)
