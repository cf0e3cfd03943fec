#!/usr/bin/env python
"""Ingest cost against archive size: driver memory, wall time, plan / index / manifest sizes and storage reads.

Generates archives of tiny, distinct 16x16 PNGs in a PACS-like tree (100 files per series folder, 100 series
per patient folder), evicts them from the page cache (``posix_fadvise(DONTNEED)``, so that reads reach the
disk and are counted), then runs ``medssl ingest`` on each in a fresh process and records:
- the driver's peak RSS (VmHWM of the process that runs ``ingest()``; pool and decode workers excluded);
- wall time and files/s;
- bytes of plan/, index.json, manifest/ and content.sqlite;
- bytes the ingest hashed (report ``this_run.bytes_read``) per input byte: one read of every file;
- bytes the decode workers read from storage (Linux task I/O accounting, page-cache hits excluded) per
  input byte, and per input byte rounded up to 4 KiB pages (a file occupies whole pages on disk, so for
  files of ~300 bytes the page count, not the byte count, is what one read of each file costs).

    python benchmarks/scale.py --sizes 10000 100000 1000000 --data /tmp/scale --json /tmp/scale.json
    python benchmarks/scale.py --incremental 100000 --data /tmp/scale   # add 10% to a dataset

Archives are generated once under --data and reused. Run on a quiet machine: wall times are shared.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medssl.machine import machine_facts

PAGE = 4096
FILES_PER_SERIES, SERIES_PER_PATIENT = 100, 100

# Runs ingest() in a fresh interpreter and prints the driver's own peak RSS with the report.
_DRIVER = """
import json, sys
from pathlib import Path
from medssl.config import IngestConfig
from medssl.ingest import ingest
cfg = IngestConfig(inputs=[Path(sys.argv[1])], out=Path(sys.argv[2]), workers=int(sys.argv[3]))
summary = ingest(cfg, show_progress=False)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"driver_peak_rss_bytes": hwm, "report": summary.report}))
"""


def generate(folder: Path, n: int, start: int = 0) -> None:
    """``n`` distinct 16x16 PNGs numbered from ``start`` (the number is written into the pixels)."""
    done = folder / f".complete-{n}" if start == 0 else folder / f".added-{start}-{n}"
    if done.exists():
        return
    if start == 0:
        shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    for i in range(start, start + n):
        series = (folder / f"p{i // (FILES_PER_SERIES * SERIES_PER_PATIENT):05d}"
                  / f"s{(i // FILES_PER_SERIES) % SERIES_PER_PATIENT:03d}")
        if i % FILES_PER_SERIES == 0:
            series.mkdir(parents=True, exist_ok=True)
        pixels = noise.copy()
        pixels[0, :8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        (series / f"img{i % FILES_PER_SERIES:03d}.png").write_bytes(buf.getvalue())
    done.touch()


def evict(folder: Path) -> tuple[int, int, int]:
    """Drop the files from the page cache; returns (files, bytes, bytes rounded up to pages)."""
    files = size = pages = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.startswith("."):
                continue
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                n = os.fstat(fd).st_size
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            files, size, pages = files + 1, size + n, pages + -(-n // PAGE) * PAGE
    return files, size, pages


def _run_ingest(archive: Path, out: Path, workers: int) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(archive), str(out), str(workers)],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ingest of {archive} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def incremental(data: Path, n: int, workers: int, tmp: Path) -> dict:
    """Ingest an archive of ``n`` files, add n / 10 new ones (a new patient folder) and ingest again into
    the same dataset: what the second run processes and how long it takes."""
    archive = data / f"archive-grow-{n}"
    generate(archive, n)
    out = tmp / f"dataset-grow-{n}"
    shutil.rmtree(out, ignore_errors=True)
    evict(archive)
    first, first_wall = _run_ingest(archive, out, workers)
    generate(archive, n // 10, start=n)
    evict(archive)
    second, second_wall = _run_ingest(archive, out, workers)
    report = second["report"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(archive, ignore_errors=True)  # it grew: a rerun starts from n files again
    return {"files": n, "added": n // 10, "first_wall_s": round(first_wall, 1), "second_wall_s": round(second_wall, 1),
            "second_files_processed": report["throughput"]["files_processed"],
            "second_files_in_run": report["this_run"]["files"], "dataset_files": report["files"],
            "dataset_samples": report["samples"]}


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measure(data: Path, n: int, workers: int, tmp: Path, keep: bool) -> dict:
    archive = data / f"archive-{n}"
    t0 = time.perf_counter()
    generate(archive, n)
    print(f"  {n} files ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    files, size, pages = evict(archive)
    out = tmp / f"dataset-{n}"
    shutil.rmtree(out, ignore_errors=True)
    result, wall = _run_ingest(archive, out, workers)
    report = result["report"]
    storage = report["isolation"]["worker_storage_read_bytes"]
    row = {
        "files": files, "input_bytes": size, "input_bytes_in_pages": pages, "workers": workers,
        "ingested": report["status"].get("ingested", 0), "status": report["status"],
        "rejections_by_code": report["rejections_by_code"], "wall_s": round(wall, 1),
        "files_per_s": round(files / wall, 1),
        "driver_peak_rss_mb": round(result["driver_peak_rss_bytes"] / 2**20, 1),
        "plan_mb": round(_bytes_under(out / "plan") / 1e6, 2),
        "index_mb": round(_bytes_under(out / "index.json") / 1e6, 3),
        "manifest_mb": round(_bytes_under(out / "manifest") / 1e6, 2),
        "content_index_mb": round(_bytes_under(out / "content.sqlite") / 1e6, 2),
        "shards": report["shards"], "shard_mb": round(report["shard_bytes"] / 1e6, 1),
        "hashed_per_input_byte": round(report["this_run"]["bytes_read"] / size, 3),
        "storage_read_per_input_byte": round(storage / size, 3),
        "storage_read_per_input_page": round(storage / pages, 3),
    }
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| files | wall s | files/s | driver peak RSS MB | plan MB | index MB | manifest MB | content index MB "
            "| hashed / input byte | storage read / input byte | storage read / input page |")
    lines = [head, "|" + " ---: |" * 11]
    lines += [f"| {r['files']:,} | {r['wall_s']} | {r['files_per_s']} | {r['driver_peak_rss_mb']} | {r['plan_mb']} "
              f"| {r['index_mb']} | {r['manifest_mb']} | {r['content_index_mb']} | {r['hashed_per_input_byte']} "
              f"| {r['storage_read_per_input_byte']} | {r['storage_read_per_input_page']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="archive sizes in files")
    p.add_argument("--workers", type=int, default=2, help="ingest worker processes (default 2)")
    p.add_argument("--data", type=Path, default=Path("/tmp/medssl-scale"), help="where archives are generated and kept")
    p.add_argument("--tmp", type=Path, default=None, help="where datasets are written (default: --data)")
    p.add_argument("--json", type=Path, default=None, help="also save the rows as JSON")
    p.add_argument("--keep", action="store_true", help="keep the datasets (dataset-N under --tmp) for stream checks")
    p.add_argument("--incremental", type=int, metavar="N", default=None,
                   help="instead: ingest N files, add N/10, ingest again into the same dataset (time and files "
                        "processed)")
    args = p.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    print("machine:", json.dumps(machine_facts()), flush=True)
    if args.incremental:
        row = incremental(args.data, args.incremental, args.workers, args.tmp or args.data)
        print(json.dumps(row))
        if args.json:
            args.json.write_text(json.dumps({"machine": machine_facts(), "incremental": row}, indent=1))
        return 0
    rows = []
    for n in args.sizes:
        print(f"{n} files:", flush=True)
        rows.append(measure(args.data, n, args.workers, args.tmp or args.data, args.keep))
        print("  " + json.dumps(rows[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"machine": machine_facts(), "rows": rows}, indent=1))
    print()
    print(markdown(rows))
    if len(rows) > 1:
        print("\ndriver peak RSS, largest / smallest archive: "
              f"{rows[-1]['driver_peak_rss_mb'] / rows[0]['driver_peak_rss_mb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
