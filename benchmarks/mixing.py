#!/usr/bin/env python
"""How mixed are pretraining batches? The share of sample pairs in a batch that come from one series.

Contrastive negatives from the same series are near-copies, so a batch should hold series about as a
random draw from the whole data set would. For every batch this counts the pairs of samples that share
a series (``linkage.series`` of the sample; samples without one, such as PNG or NIfTI, are grouped by
their source file). The i.i.d. expectation is the probability that two samples drawn without
replacement from the whole data set share a series: sum_g n_g (n_g - 1) / (N (N - 1)).

Two modes, each run once per ``--interleave`` value (parts a stream reader reads at once; 1 is the
stream before issue 10: one contiguous run per reader):

- DATASET ...: streams ingest output folders exactly as ``medssl pretrain`` does (``ShardStream`` with its
  batch size, DataLoader workers, shuffle buffer, ranks). Pixels are decoded (the stream does that) but
  not transformed.
- ``--synthetic N``: N samples at the index level, laid out as ``medssl ingest`` writes a PACS-like
  archive: series of 30-300 slices in folder order, work units of 256 files, a new shard once a unit's
  shard holds 1,000 samples (``--files volumes``: one file per series, as NIfTI or multi-frame DICOM;
  ``--files slices``: one file per slice, as classic DICOM, so each unit is one shard of 256). Only an
  ``index.json`` is written; ``ShardStream.reader_plan`` (the stream's own planning: shard order, parts,
  shuffle) gives each batch's samples, and nothing is decoded.

Printed per interleave value: the mean same-series pair share over all batches and its ratio to the
i.i.d. expectation, the worst batch, the mean over each epoch's first batches, and how many samples the
readers read from shards per sample they use (a part starting inside a shard reads it from its start).
A last row draws as many batches at random from the whole data set: the worst batch of a truly i.i.d.
stream, for comparison.

Run from the repository root:
  .venv/bin/python benchmarks/mixing.py DATASET [DATASET ...] [--batch-size 64] [--workers 2] [--epochs 2]
  .venv/bin/python benchmarks/mixing.py --synthetic 1000000 --world-size 2 --workers 2 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from medssl.data.stream import INDEX_FORMAT, ShardStream, part_of
from medssl.machine import machine_facts
from medssl.shard_format import read_shard

FIRST_BATCHES = 5  # "start of an epoch": the first batches each DataLoader worker delivers after a refill
FILES_PER_UNIT, SAMPLES_PER_SHARD = 256, 1000  # medssl ingest's defaults
SERIES_SLICES = (30, 300)


def group_of(meta: dict) -> str:
    return (meta.get("linkage") or {}).get("series") or meta["source"]["sha256"]


def no_transform(values, semantics):
    """The stream's transform hook: keep a scalar, the pixels are not needed here."""
    return 0.0


def same_group_share(groups) -> float:
    n = len(groups)
    pairs = sum(c * (c - 1) for c in Counter(groups).values())
    return pairs / (n * (n - 1))


def iid_share(counts) -> float:
    counts = np.asarray(list(counts), dtype=np.float64)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def streamed_batches(args, interleave: int) -> tuple[list[float], list[float]]:
    """Same-series shares of every batch, and of each epoch's first batches, streaming real shards."""
    shares, first = [], []
    for rank in range(args.world_size):
        stream = ShardStream(args.datasets, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
                             shuffle_buffer=args.shuffle_buffer, interleave=interleave, transform=no_transform,
                             rank=rank, world_size=args.world_size)
        loader = stream.loader()
        for _ in range(args.epochs):
            for b, batch in enumerate(loader):
                share = same_group_share([group_of(m) for m in batch["meta"]])
                shares.append(share)
                if b < FIRST_BATCHES * max(1, args.workers):
                    first.append(share)
    return shares, first


def reader_plans(args, roots, interleave: int):
    """The ReaderPlan of every (rank, epoch, DataLoader worker) reader, as the stream plans them."""
    for rank in range(args.world_size):
        stream = ShardStream(roots, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
                             shuffle_buffer=args.shuffle_buffer, interleave=interleave, rank=rank,
                             world_size=args.world_size)
        for epoch in range(args.epochs):
            for worker in range(args.workers):
                yield stream.reader_plan(epoch, worker, args.workers)


def read_per_used(args, datasets: list[Path], interleave: int) -> float:
    """Samples read from shards per sample used: a part starting inside a shard reads the shard from its start."""
    read = used = 0
    for plan in reader_plans(args, datasets, interleave):
        segments = [seg for part in plan.parts for seg in part]
        read += sum(seg.first + seg.count for seg in segments)
        used += sum(seg.count for seg in segments)
    return read / used


def iid_batches(args, counts, n_batches: int) -> list[float]:
    """Same-series shares of batches drawn at random from the whole data set, for the worst-batch spread."""
    groups = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(args.seed)
    shares = []
    while len(shares) < n_batches:
        for batch in rng.permutation(groups)[:len(groups) // args.batch_size * args.batch_size].reshape(
                -1, args.batch_size):
            _, c = np.unique(batch, return_counts=True)
            shares.append(float((c * (c - 1)).sum()) / (args.batch_size * (args.batch_size - 1)))
    return shares[:n_batches]


def synthetic_layout(n_samples: int, files: str, rng: np.random.Generator, deal: int = 1,
                     shuffle_units: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """(series id of every sample of every shard, in index order; samples per series) for an archive
    written as ``medssl ingest`` does: files in folder order, dealt round-robin to the ``deal`` units of
    each block of deal * 256 files, shards cut between files."""
    lengths = rng.integers(SERIES_SLICES[0], SERIES_SLICES[1] + 1, n_samples // SERIES_SLICES[0] + 1)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), n_samples) + 1]
    lengths[-1] -= lengths.sum() - n_samples
    series = np.repeat(np.arange(len(lengths)), lengths)
    file_sizes = lengths if files == "volumes" else np.ones(n_samples, dtype=np.int64)
    file_series = np.arange(len(lengths)) if files == "volumes" else series
    block = deal * FILES_PER_UNIT
    order = np.concatenate([np.arange(b, min(b + block, len(file_sizes)))[j::deal]
                            for b in range(0, len(file_sizes), block) for j in range(deal)])
    file_sizes, file_series = file_sizes[order], file_series[order]
    series = np.repeat(file_series, file_sizes)
    file_ends = np.cumsum(file_sizes)
    shards, start = [], 0
    for unit, unit_start in enumerate(range(0, len(file_sizes), FILES_PER_UNIT)):
        stop = int(file_ends[min(unit_start + FILES_PER_UNIT, len(file_sizes)) - 1])
        samples = series[start:stop]
        if shuffle_units:  # as medssl ingest's SampleSpool: the unit's samples shuffled, then cut evenly
            samples = samples[np.random.default_rng([2, unit]).permutation(len(samples))]
            shards += np.array_split(samples, -(-len(samples) // SAMPLES_PER_SHARD))
        else:  # before: in file order, a new shard once a file takes the shard past SAMPLES_PER_SHARD
            ends = file_ends[unit_start:unit_start + FILES_PER_UNIT] - start
            cut, pending_start = [], 0
            for end in ends:
                if end - pending_start >= SAMPLES_PER_SHARD or end == ends[-1]:
                    cut.append(samples[pending_start:int(end)])
                    pending_start = int(end)
            shards += cut
        start = stop
    return shards, lengths


def planned_batches(args, interleave: int, folder: Path, shard_series: dict[str, np.ndarray]):
    """Same-series shares of every batch, and of each epoch's first batches, from the stream's plan."""
    shares, first = [], []
    for plan in reader_plans(args, folder, interleave):
        in_parts = [np.concatenate([shard_series[Path(seg.shard.path).name][seg.first:seg.first + seg.count]
                                    for seg in segments] or [np.empty(0, dtype=np.int64)])
                    for segments in plan.parts]
        part_start = np.cumsum([0] + [len(p) for p in in_parts])
        flat = np.concatenate(in_parts)
        located = [part_of(t, plan.samples, len(plan.parts)) for t in plan.shuffle]
        order = flat[[part_start[k] + j for k, j in located]]
        for b, batch in enumerate(order.reshape(-1, args.batch_size)):
            _, counts = np.unique(batch, return_counts=True)
            share = float((counts * (counts - 1)).sum()) / (args.batch_size * (args.batch_size - 1))
            shares.append(share)
            if b < FIRST_BATCHES:
                first.append(share)
    return shares, first


def write_index(folder: Path, shards: list[np.ndarray]) -> dict[str, np.ndarray]:
    names = [f"shard-{i:07d}.tar" for i in range(len(shards))]
    index = {"format": INDEX_FORMAT, "samples": int(sum(len(s) for s in shards)),
             "shards": [{"name": name, "samples": len(s)} for name, s in zip(names, shards)]}
    (folder / "index.json").write_text(json.dumps(index))
    return dict(zip(names, shards))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", type=Path, help="ingest output folders")
    p.add_argument("--synthetic", type=int, metavar="N", help="plan N synthetic samples instead of streaming")
    p.add_argument("--files", choices=("volumes", "slices"), default="volumes",
                   help="synthetic archive: one file per series or per slice")
    p.add_argument("--deal", type=int, default=1, metavar="W",
                   help="synthetic archive: files dealt round-robin to the W units of a block (ingest's mix_units)")
    p.add_argument("--shuffle-units", action="store_true",
                   help="synthetic archive: each unit's samples shuffled before they are cut into shards "
                        "(ingest today)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--interleave", type=int, nargs="+", default=[1, 16],
                   help="parts per reader to compare (1: the stream before issue 10)")
    p.add_argument("--world-size", type=int, default=1, help="ranks to simulate, one after the other")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if bool(args.datasets) == bool(args.synthetic):
        p.error("give ingest output folders or --synthetic N, not both")
    facts = machine_facts()
    print(f"command: python benchmarks/mixing.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {facts['cpu']}, {facts['usable_cores']} cores, python {facts['python']}")

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            shards, lengths = synthetic_layout(args.synthetic, args.files, np.random.default_rng(args.seed),
                                              args.deal, args.shuffle_units)
            shard_series = write_index(Path(tmp), shards)
            counts = lengths
            print(f"synthetic archive: {args.files} layout, {len(shards)} shards")
        else:
            counts = Counter()
            for dataset in args.datasets:
                for shard in sorted((dataset / "shards").glob("*.tar")):
                    counts.update(group_of(s.meta) for s in read_shard(shard))
            counts = list(counts.values())
        expected = iid_share(counts)
        print(f"{sum(counts)} samples in {len(counts)} series (or source files); largest {max(counts)}; "
              f"i.i.d. same-series pair share {expected:.6f}")

        def shown(share: float) -> str:  # no series with two samples: every ratio is undefined
            return f"{share:.5f} ({share / expected:.1f}x)" if expected > 0 else f"{share:.5f}"

        print("\n| interleave | batches | mean share | worst batch | mean of each epoch's first batches "
              "| samples read per sample used |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
        datasets = [Path(tmp)] if args.synthetic else args.datasets
        for interleave in args.interleave:
            if args.synthetic:
                shares, first = planned_batches(args, interleave, Path(tmp), shard_series)
            else:
                shares, first = streamed_batches(args, interleave)
            print(f"| {interleave} | {len(shares)} | {shown(np.mean(shares))} | {shown(max(shares))} "
                  f"| {shown(np.mean(first))} | {read_per_used(args, datasets, interleave):.2f} |", flush=True)
        iid = iid_batches(args, counts, len(shares))
        print(f"| i.i.d. draw | {len(iid)} | {shown(np.mean(iid))} | {shown(max(iid))} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
