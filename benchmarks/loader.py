#!/usr/bin/env python
"""Loader throughput per core: what one DataLoader worker delivers per CPU-second (issue 12, point 4).

Measured on one process, 1 torch thread, 0 DataLoader workers (the loop a worker runs), batch 1:

- decode only: ``ShardStream`` yielding float32 values (tar reading, JSON, shuffle buffer, decode and
  float conversion): what a worker does with crops on the training device when it hands out floats;
- decode stored: ``ShardStream(pixels="stored")`` + ``collate_stored`` in batches of ``--batch``: what a
  worker does with ``crops_on: device`` (uint16 values on a canvas, no float conversion);
- decode + CPU multi-crop: the same stream with ``MultiCrop`` of the ``--crops`` preset as its
  transform, what a worker does with ``crops_on: loader`` (the default);
- device crops on this CPU, for reference: ``DeviceMultiCrop`` over batches of ``--batch`` decoded
  images (on a GPU it runs on the device; here it shows the batched code's cost on one core).

Each is given as samples per CPU-second of this process (``time.process_time``: robust to other load on
a shared machine, and what one loader core delivers) and per wall-second. A breakdown times the parts
of the per-sample cost on the first shards' samples: tar reading with JSON parsing, zstd, byte planes to
uint16, float conversion. The rest of the stream's cost (shuffle buffer, interleaved parts) is the
difference to the decode-only rate. Each measurement takes ``--samples`` samples after ``--warmup``.

Shards: ``--shards DIR`` (a ``medssl ingest`` output); default: a cache folder, made on first use with
``medssl ingest --quiet`` from ``--source`` (default: the shared brain MR set, 512 px).

Run from the repository root:  .venv/bin/python benchmarks/loader.py [--shards DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import zstandard

from medssl.config import PretrainConfig
from medssl.data.augment import MultiCrop
from medssl.data.device_crops import DeviceMultiCrop
from medssl.data.stream import ShardStream, collate_stored, list_shards
from medssl.machine import machine_facts, version
from medssl.shard_format import decode_pixels, decode_stored, read_shard

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "brain-tumor-mri" / "Training"
DEFAULT_SHARDS = Path(tempfile.gettempdir()) / "medssl-bench" / "loader-shards"


def ensure_shards(shards: Path, source: Path) -> Path:
    """``shards`` if it holds a finished ingest; otherwise ``medssl ingest source --out shards``."""
    if (shards / "index.json").is_file():
        return shards
    if not source.is_dir():
        sys.exit(f"no shards at {shards} and no folder {source} to make them from; pass --shards DIR "
                 "(a `medssl ingest` output) or --source DIR")
    print(f"making shards: medssl ingest {source} --out {shards}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medssl.cli", "ingest", str(source), "--out", str(shards), "--quiet"],
                   check=True)
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return shards


def rates(samples: int, wall: float, cpu: float) -> dict:
    return {"samples": samples, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "per_cpu_s": round(samples / cpu, 1), "per_wall_s": round(samples / wall, 1)}


def timed(items, n: int, warmup: int, per_item: int = 1, step=lambda item: None) -> dict:
    """Rates of taking ``n`` items of ``per_item`` samples each from the iterator ``items`` (after
    ``warmup`` items), calling ``step`` on each."""
    for item in itertools.islice(items, warmup):
        step(item)
    wall, cpu = time.perf_counter(), time.process_time()
    for item in itertools.islice(items, n):
        step(item)
    return rates(n * per_item, time.perf_counter() - wall, time.process_time() - cpu)


def stream(shards: Path, **kwargs) -> ShardStream:
    return ShardStream(shards, batch_size=1, num_workers=0, seed=0, **kwargs)


def stored_batches(shards: Path, batch: int):
    """Batches as a worker makes them for crops on the device: stored samples, collated onto a canvas."""
    samples = iter(stream(shards, pixels="stored"))
    while chunk := list(itertools.islice(samples, batch)):
        yield collate_stored(chunk)


def breakdown(shards: Path, n: int) -> dict:
    """Microseconds per sample of the parts of decoding, on the first ``n`` samples of the shards."""
    paths = [s.path for s in list_shards([shards])]
    start = time.process_time()
    samples = list(itertools.islice((s for p in paths for s in read_shard(p)), n))
    parts = {"tar and json": (time.process_time() - start) / len(samples)}
    zstd_samples = [s for s in samples if s.meta["intensity"]["store"].get("format") == "u16-planes-zstd"]
    if zstd_samples:
        start = time.process_time()
        for s in zstd_samples:
            zstandard.ZstdDecompressor().decompress(s.pixels)
        parts["zstd"] = (time.process_time() - start) / len(zstd_samples)
    for name, decode in (("decode to uint16 (decode_stored)", decode_stored),
                         ("decode to float32 (decode_pixels)", decode_pixels)):
        start = time.process_time()
        for s in samples:
            decode(s.pixels, s.meta)
        parts[name] = (time.process_time() - start) / len(samples)
    return {k: round(v * 1e6, 1) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shards", type=Path, default=None,
                        help=f"a `medssl ingest` output folder (default: {DEFAULT_SHARDS}, made if missing)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help=f"what to ingest when the shards are missing (default: {DEFAULT_SOURCE})")
    parser.add_argument("--samples", type=int, default=1000, help="samples per stream measurement (default 1000)")
    parser.add_argument("--warmup", type=int, default=50, help="samples taken before each measurement (default 50)")
    parser.add_argument("--crops", choices=["cpu", "swav"], default="cpu",
                        help="multi-crop preset (default cpu: 2x96 + 4x48)")
    parser.add_argument("--batch", type=int, default=64,
                        help="images per batch for collate_stored and the device crops (default 64)")
    parser.add_argument("--device-batches", type=int, default=4,
                        help="batches timed for the device crops on CPU (default 4)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    args = parser.parse_args()
    if min(args.samples, args.batch, args.device_batches) < 1 or args.warmup < 0:
        parser.error("--samples, --batch and --device-batches must be >= 1, --warmup >= 0")

    torch.set_num_threads(1)
    shards = ensure_shards(args.shards or DEFAULT_SHARDS, args.source)
    first = next(read_shard(list_shards([shards])[0].path))
    result = {"machine": machine_facts(), "versions": {"torch": version("torch"), "numpy": version("numpy"),
                                                      "zstandard": version("zstandard")},
              "shards": str(shards), "pixel_format": first.meta["intensity"]["store"].get("format", "png16"),
              "image_size": first.meta["size"], "crops": args.crops, "torch_threads": 1, "workers": 0}
    print(json.dumps({k: result[k] for k in ("machine", "pixel_format", "image_size")}), flush=True)

    n, warm, batch = args.samples, args.warmup, args.batch
    crops = PretrainConfig(crops=args.crops).multicrop()
    measured = {
        "decode only (float32)": lambda: timed(iter(stream(shards)), n, warm),
        "decode stored + collate (crops_on: device)": lambda: timed(
            stored_batches(shards, batch), max(1, n // batch), max(1, warm // batch), per_item=batch),
        f"decode + CPU multi-crop {args.crops} (crops_on: loader)": lambda: timed(
            iter(stream(shards, transform=MultiCrop(crops))), n, warm),
    }
    result["stream"] = {}
    for name, run in measured.items():
        got = result["stream"][name] = run()
        print(f"{name:52s} {got['per_cpu_s']:8.0f} samples/CPU-s  {got['per_wall_s']:8.0f} samples/s wall", flush=True)

    device = DeviceMultiCrop(crops)
    batches = list(itertools.islice(stored_batches(shards, batch), args.device_batches + 1))
    got = result["device crops on CPU"] = timed(iter(batches), args.device_batches, 1, per_item=batch,
                                                step=lambda b: device.views(b, torch.device("cpu")))
    print(f"{f'device crops on CPU (reference, batch {batch})':52s} {got['per_cpu_s']:8.0f} images/CPU-s  "
          f"{got['per_wall_s']:8.0f} images/s wall", flush=True)

    result["breakdown_us_per_sample"] = breakdown(shards, min(n, 500))
    for name, us in result["breakdown_us_per_sample"].items():
        print(f"  {name:50s} {us:8.1f} us/sample")
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
