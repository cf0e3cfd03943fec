#!/usr/bin/env python
"""How mixed are pretraining batches? The share of sample pairs in a batch that come from one series.

Contrastive negatives from the same series are near-copies, so a batch should hold series about as a
random draw from the whole data set would. This streams the shards exactly as ``medssl pretrain`` does
(``ShardStream`` with its batch size, DataLoader workers, shuffle buffer, ranks) and, for every batch,
counts the pairs of samples that share a series (``linkage.series`` of the sample; samples without one,
such as PNG or NIfTI, are grouped by their source file). The i.i.d. expectation is the probability that
two samples drawn without replacement from the whole data set share a series:
sum_g n_g (n_g - 1) / (N (N - 1)).

Printed: the mean same-series pair share over all batches and its ratio to the i.i.d. expectation, the
worst batch, and the mean over each epoch's first batches (when the shuffle buffer is refilled from the
first shards). Pixels are decoded (the stream does that) but not transformed.

Run from the repository root:
  .venv/bin/python benchmarks/mixing.py DATASET [DATASET ...] [--batch-size 64] [--workers 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from machine import machine_facts  # benchmarks/machine.py
from medssl.data.stream import ShardStream
from medssl.shard_format import read_shard

FIRST_BATCHES = 5  # "start of an epoch": the first batches each DataLoader worker delivers after a refill


def group_of(meta: dict) -> str:
    return (meta.get("linkage") or {}).get("series") or meta["source"]["sha256"]


def no_transform(values, semantics):
    """The stream's transform hook: keep a scalar, the pixels are not needed here."""
    return 0.0


def same_group_share(groups: list[str]) -> float:
    n = len(groups)
    pairs = sum(c * (c - 1) for c in Counter(groups).values())
    return pairs / (n * (n - 1))


def iid_share(counts: Counter) -> float:
    n = sum(counts.values())
    return sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", type=Path, help="ingest output folders")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--world-size", type=int, default=1, help="ranks to simulate, one after the other")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    facts = machine_facts()
    print(f"command: python benchmarks/mixing.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {facts['cpu']}, {facts['usable_cores']} cores, python {facts['python']}")

    counts: Counter = Counter()
    for dataset in args.datasets:
        for shard in sorted((dataset / "shards").glob("*.tar")):
            counts.update(group_of(s.meta) for s in read_shard(shard))
    expected = iid_share(counts)
    print(f"{sum(counts.values())} samples in {len(counts)} series (or source files); "
          f"largest {counts.most_common(1)[0][1]}; i.i.d. same-series pair share {expected:.5f}")

    shares, first = [], []
    for rank in range(args.world_size):
        stream = ShardStream(args.datasets, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
                             shuffle_buffer=args.shuffle_buffer, transform=no_transform, rank=rank,
                             world_size=args.world_size)
        loader = stream.loader()
        for _ in range(args.epochs):
            for b, batch in enumerate(loader):
                share = same_group_share([group_of(m) for m in batch["meta"]])
                shares.append(share)
                if b < FIRST_BATCHES * max(1, args.workers):
                    first.append(share)
    def shown(share: float) -> str:  # no series with two samples: every ratio is undefined
        return f"{share:.5f} ({share / expected:.1f}x i.i.d.)" if expected > 0 else f"{share:.5f}"

    shares_a = np.array(shares)
    print(f"\n| measure | value |\n| --- | ---: |\n"
          f"| batches (ranks x epochs x steps) | {len(shares)} |\n"
          f"| i.i.d. expectation | {expected:.5f} |\n"
          f"| mean same-series pair share | {shown(shares_a.mean())} |\n"
          f"| worst batch | {shown(shares_a.max())} |\n"
          f"| mean of each epoch's first {FIRST_BATCHES * max(1, args.workers)} batches | {shown(np.mean(first))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
