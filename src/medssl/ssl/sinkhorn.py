"""Sinkhorn-Knopp codes: soft cluster assignments under an equipartition constraint.

SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments"), Sec. 3.1, Eq. 3 and Alg. 1; the distributed form follows ``distributed_sinkhorn`` of
facebookresearch/swav.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from medssl.distributed import all_reduce_


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Codes Q* = Diag(u) exp(C^T Z / epsilon) Diag(v) for prototype scores ``scores`` (B, K).

    Rows of Q (prototypes) and columns (samples) are normalised in turn, ``iterations`` times. When
    ``torch.distributed`` is initialised the row sums are all-reduced, so each rank's codes equal
    the rows of the single-process computation over the batch concatenated across ranks.

    Alg. 1 also divides rows by K and columns by B and multiplies by B at the end; each of those
    constants is cancelled by the normalisation that follows it, so they are left out and the
    result is the same. Returns codes (B, K) whose rows sum to 1, computed in at least float32.
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn iterations must be >= 1, got {iterations}")
    scores = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    q = scores.t() / epsilon  # (K, B): rows are prototypes, columns samples, as in the paper
    # exp(1 / 0.01) overflows float32. A per-prototype factor is cancelled exactly by the first row
    # normalisation, so subtracting each prototype's maximum over the global batch keeps exp()
    # finite (and every row non-zero) without changing the codes.
    row_max = all_reduce_(q.max(dim=1, keepdim=True).values, dist.ReduceOp.MAX)
    q = torch.exp(q - row_max)
    for _ in range(iterations):
        # Equipartition: every prototype gets the same total mass over the samples of all ranks.
        q /= all_reduce_(q.sum(dim=1, keepdim=True))
        # Each sample's codes are a distribution over prototypes; a column lives on one rank only.
        q /= q.sum(dim=0, keepdim=True)
    return q.t()
