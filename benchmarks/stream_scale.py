#!/usr/bin/env python
"""The pretraining stream at archive size: every sample exactly once per epoch, worker memory flat.

Reads one epoch of each dataset (e.g. the ones ``benchmarks/scale.py --keep`` leaves: 10k, 100k and 1M
tiny samples) as 2 ranks x 2 DataLoader workers would, one rank after the other in this process, with the
default shuffle buffer (1,000) and interleave (32). Records, per dataset: samples read, distinct keys
(equal: nothing read twice), samples the epoch leaves out (fewer than world_size x batch_size: the rest
that cannot fill a batch on every rank), the largest DataLoader worker's peak RSS (VmHWM, sampled while
the epoch runs) and samples/s.

    python benchmarks/stream_scale.py /work/scale/dataset-10000 /work/scale/dataset-1000000 --json /tmp/stream.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from medssl.data.stream import ShardStream, list_shards

WORLD_SIZE, WORKERS, BATCH = 2, 2, 256


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def no_transform(values, semantics):
    return values.shape  # the decoded image is checked to exist; batches stay tiny


def epoch(dataset: Path) -> dict:
    total = sum(s.samples for s in list_shards([dataset]))
    seen: set[bytes] = set()  # 8-byte digests of the keys: the check's own memory stays small
    read = 0
    peak = 0
    start = time.perf_counter()
    for rank in range(WORLD_SIZE):
        stream = ShardStream(dataset, batch_size=BATCH, num_workers=WORKERS, rank=rank, world_size=WORLD_SIZE,
                             transform=no_transform)
        # spawn: a forked worker would count pages of this checker (its set of keys) in its own RSS
        for i, batch in enumerate(stream.loader(multiprocessing_context="spawn")):
            for key in batch["key"]:
                seen.add(hashlib.blake2b(key.encode(), digest_size=8).digest())
            read += len(batch["key"])
            if i % 50 == 0:
                peak = max([peak] + [_hwm(c) for c in _children(os.getpid())])
    seconds = time.perf_counter() - start
    return {"dataset": str(dataset), "samples": total, "read": read, "distinct": len(seen),
            "left_out": total - read, "left_out_bound": WORLD_SIZE * BATCH,
            "worker_peak_rss_mb": round(peak / 2**20, 1), "samples_per_s": round(read / seconds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", type=Path, nargs="+", help="ingest output folders")
    p.add_argument("--json", type=Path, help="also save the rows as JSON")
    args = p.parse_args(argv)
    rows = []
    for dataset in args.datasets:
        rows.append(epoch(dataset))
        print(json.dumps(rows[-1]), flush=True)
        ok = rows[-1]["read"] == rows[-1]["distinct"] and 0 <= rows[-1]["left_out"] < rows[-1]["left_out_bound"]
        print("  every sample at most once, all but the unfillable rest read:", ok, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\n| samples | read | distinct | left out | worker peak RSS MB | samples/s |\n"
          "| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['samples']:,} | {r['read']:,} | {r['distinct']:,} | {r['left_out']} | {r['worker_peak_rss_mb']} "
              f"| {r['samples_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
