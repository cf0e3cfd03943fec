"""Two gloo processes on CPU compute what one process computes on the concatenated batch.

Each rank holds one half of a global batch. We check that the ranks' Sinkhorn codes, concatenated,
equal the single-process codes; and that for InfoNCE (negatives gathered with gradient) and SwAV
(with a per-rank queue) the mean of the ranks' losses equals the single-process loss, and each
rank's gradient divided by the world size (DDP's averaging) equals the single-process gradient of
its half. Tolerance: 1e-6 absolute and relative, float32; only the order of summation differs.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medssl.ssl import InfoNCELoss, SwAVLoss, sinkhorn_knopp

WORLD, BATCH, QUEUE, DIM, K, N_CROPS = 2, 6, 4, 8, 10, 4
TOL = {"atol": 1e-6, "rtol": 1e-6}


def global_inputs() -> dict[str, torch.Tensor]:
    """The concatenated batch of all ranks; rank r holds rows [r * BATCH, (r + 1) * BATCH)."""
    g = torch.Generator().manual_seed(0)
    prototypes = F.normalize(torch.randn(K, DIM, generator=g), dim=1)
    z = [F.normalize(torch.randn(WORLD * BATCH, DIM, generator=g), dim=1) for _ in range(N_CROPS)]
    queue = [F.normalize(torch.randn(WORLD * QUEUE, DIM, generator=g), dim=1) for _ in range(2)]
    return {
        "z0": z[0],
        "z1": z[0] + 0.3 * z[1],
        "scores": torch.stack([v @ prototypes.t() for v in z]),
        "queue_scores": torch.stack([q @ prototypes.t() for q in queue]),
    }


def rank_part(x: torch.Tensor, rank: int, size: int = BATCH) -> torch.Tensor:
    return x[..., rank * size : (rank + 1) * size, :].clone().requires_grad_()


def losses_and_grads(z0, z1, scores, queue_scores) -> dict[str, torch.Tensor]:
    out = {"codes": sinkhorn_knopp(scores[0])}
    nce = InfoNCELoss(temperature=0.2)(z0, z1)
    nce.backward()
    swav = SwAVLoss(n_global=2)(list(scores.unbind()), list(queue_scores.unbind()))
    swav.backward()
    return out | {
        "nce": nce.detach(),
        "nce_grad0": z0.grad,
        "nce_grad1": z1.grad,
        "swav": swav.detach(),
        "swav_grad": scores.grad,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x = global_inputs()
        result = losses_and_grads(
            rank_part(x["z0"], rank),
            rank_part(x["z1"], rank),
            rank_part(x["scores"], rank),
            rank_part(x["queue_scores"], rank, QUEUE).detach(),
        )
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("ssl_distributed")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    x = global_inputs()
    return losses_and_grads(
        x["z0"].requires_grad_(), x["z1"].requires_grad_(), x["scores"].requires_grad_(), x["queue_scores"]
    )


def test_sinkhorn_codes_equal_single_process(ranks, single):
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), single["codes"], **TOL)
    # The all-reduce matters: codes computed from one rank's half alone differ.
    alone = sinkhorn_knopp(global_inputs()["scores"][0][:BATCH])
    assert (alone - single["codes"][:BATCH]).abs().max() > 1e-3


def test_infonce_loss_and_gradients_equal_single_process(ranks, single):
    torch.testing.assert_close(sum(r["nce"] for r in ranks) / WORLD, single["nce"], **TOL)
    for name in ("nce_grad0", "nce_grad1"):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]) / WORLD, single[name], **TOL)


def test_swav_with_queue_loss_and_gradients_equal_single_process(ranks, single):
    torch.testing.assert_close(sum(r["swav"] for r in ranks) / WORLD, single["swav"], **TOL)
    torch.testing.assert_close(torch.cat([r["swav_grad"] for r in ranks], dim=1) / WORLD, single["swav_grad"], **TOL)
