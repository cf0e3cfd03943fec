#!/usr/bin/env python
"""Benchmark ``medssl ingest`` against a plain pydicom + Pillow loop over the same files, in one run.

What is measured, per corpus:

- ours: ``medssl.ingest.ingest`` (local engine) with 1 and with 2 workers, each into a fresh output
  folder. Two rates: "processing" is the ingest report's own throughput (per-file work + shard
  writing, scan and hashing excluded); "end to end" is the wall time of the whole ``ingest()`` call
  measured here (scan, SHA-256 of every file, worker start-up, processing, manifest and report).
- peer: a single-process loop over the same files: DICOM -> ``pydicom.dcmread`` + ``.pixel_array``
  + a minimal conversion to uint8/uint16 + Pillow PNG save of every frame; PNG/JPEG -> Pillow open +
  PNG save. Files the loop cannot handle are counted as failed. It runs twice: with Pillow's default
  PNG compression (what a plain loop does) and with compress_level=1 (what our shards use).

Every file is read once before timing, so all methods see a warm page cache. PNGs are written to a
temporary folder on the same file system as our shards. With ``--repeats N`` every measurement runs N
times, round-robin over the methods, and each keeps its fastest repeat (all wall times go to --json).

Estimated core-hours for 100M images = 1e8 / (images/s per core) / 3600, where images/s per core is
the end-to-end images/s divided by the number of worker processes. Because wall time on a shared
machine depends on its other load, a second estimate uses CPU time instead: 1e8 / (images per
CPU-second, counting the process and its pool workers) / 3600.

``--format-study`` adds a comparison of storage formats on the 16-bit images our ingest wrote:
bytes per image and encode/decode time for 16-bit PNG (compress_level 1, ours), 16-bit PNG at Pillow's
default level 6, and raw uint16 ``.npy``; and the candidates of issue 12: raw uint16 compressed with
zstd (levels 1, 3, 9, 19) or lz4, each as is, as two byte planes (low bytes, then high bytes) and as a
horizontal delta in byte planes; and the lossless codecs of ``imagecodecs`` (JPEG-XL, JPEG-LS,
JPEG 2000, HTJ2K; QOI and WebP are probed and skipped: 8-bit only). Every format must give back the
same uint16 array; codecs run single-threaded, as in a data-loader process. Each format encodes once
and decodes ``--format-repeats`` times (round-robin over the formats; the fastest pass counts). The
summary compares each with 16-bit PNG level 1: size ratio and decode speed-up, per corpus and over all
corpora (all: summed bytes and times, every image weighing the same).

Run from the repository root:  .venv/bin/python benchmarks/ingest.py [--limit 200] [--repeats 3] [--format-study]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shlex
import shutil
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from medssl.config import IngestConfig
from medssl.ingest import ingest
from medssl.machine import machine_facts
from medssl.shard_format import PNG_COMPRESS_LEVEL, decode_pixels, read_shard

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_CORPORA = ("head-ct-hemorrhage", "brain-tumor-mri")
ALL_CORPORA = ("pydicom-data",) + SHARED_CORPORA
PILLOW_DEFAULT_LEVEL = 6  # Pillow's PNG default (zlib's default)


# --------------------------------------------------------------------------------------------- corpora


def pydicom_data_dir() -> Path | None:
    try:
        import data_store
    except ImportError:
        return None
    return Path(os.path.dirname(data_store.__file__)) / "data"


def list_files(root: Path, limit: int | None) -> list[Path]:
    """Every file under ``root`` (the task CSV included: an archive holds such files too), sorted.

    With a limit, files are taken at an even stride so that a quick run still sees every class folder.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if limit is not None and len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def corpora(names: list[str], shared: Path, limit: int | None) -> dict[str, tuple[list[Path], list[Path]]]:
    """name -> (what ours is given: the corpus folder, or the selected files with --limit; the files)."""
    found = {}
    for name in names:
        root = pydicom_data_dir() if name == "pydicom-data" else shared / name
        if root is None or not root.is_dir():
            where = "pip install pydicom-data" if name == "pydicom-data" else f"expected at {root}"
            print(f"skipping corpus {name}: not found ({where})")
            continue
        files = list_files(root, limit)
        if files:
            everything = limit is None or len(files) == len(list_files(root, None))
            found[name] = ([root] if everything else files, files)
    return found


def warm_cache(files: list[Path]) -> int:
    total = 0
    for p in files:
        total += len(p.read_bytes())
    return total


# ------------------------------------------------------------------------------------------------ ours


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool's workers once it has joined them).

    On a shared machine wall time depends on what else runs; CPU time much less so.
    """
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_ours(inputs: list[Path], n_files: int, workers: int, out: Path, salt_file: Path) -> dict:
    """``inputs`` as a user would give them: the corpus folder (or, for a --limit run, the chosen files)."""
    cfg = IngestConfig(inputs=inputs, out=out, workers=workers, engine="local", salt_file=salt_file)
    cpu0, start = cpu_seconds(), time.perf_counter()
    summary = ingest(cfg, show_progress=False)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    # Decode workers are grandchildren (or never-joined children): their CPU time comes from the report.
    cpu += summary.report["isolation"]["worker_cpu_s"]
    if summary.report["files"] != n_files:  # ours and the peer must see the same files
        raise RuntimeError(f"ingest saw {summary.report['files']} files, the peer loop {n_files}")
    t = summary.report["throughput"]
    status = summary.report["status"]
    mpix = sum(s.meta["size"][0] * s.meta["size"][1] for shard in sorted((out / "shards").glob("*.tar"))
               for s in read_shard(shard)) / 1e6  # counted after timing
    return {
        "method": "medssl ingest", "workers": workers, "files": summary.report["files"], "images": t["samples_written"],
        "failed": status.get("rejected", 0), "duplicates": status.get("duplicate", 0),
        "seconds": t["seconds"], "files_per_s": t["files_per_s"], "images_per_s": t["images_per_s"],
        "wall_seconds": round(wall, 3), "bytes_out": summary.report["shard_bytes"], "mpix_out": round(mpix, 2),
        "cpu_seconds": round(cpu, 3),
    }


# ------------------------------------------------------------------------------------------------ peer


def _to_pillow(frame: np.ndarray) -> Image.Image:
    """The least a plain loop must do so that Pillow can save a decoded DICOM frame as PNG."""
    if frame.ndim == 3 and frame.shape[-1] == 1:
        frame = frame[..., 0]
    if frame.ndim == 3:  # colour: Pillow saves 8-bit RGB only
        if frame.dtype != np.uint8:
            f = frame.astype(np.float64)
            span = np.ptp(f) or 1.0
            frame = ((f - f.min()) * (255.0 / span)).astype(np.uint8)
        return Image.fromarray(frame, "RGB")
    if frame.dtype in (np.uint8, np.uint16):
        return Image.fromarray(frame)
    f = frame.astype(np.float64)
    f -= f.min()
    top = f.max()
    if top > 65535:
        f *= 65535.0 / top
    return Image.fromarray(f.astype(np.uint16))


def _peer_file(path: Path, out_dir: Path, stem: str, level: int) -> tuple[int, int]:
    """(images written, pixels written) for one file."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        img = Image.open(path)
        img.save(out_dir / f"{stem}.png", format="PNG", compress_level=level)
        return 1, img.width * img.height
    ds = pydicom.dcmread(path, force=True)
    arr = ds.pixel_array
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = arr if n_frames > 1 else [arr]
    pixels = 0
    for k, frame in enumerate(frames):
        img = _to_pillow(frame)
        img.save(out_dir / f"{stem}-{k}.png", format="PNG", compress_level=level)
        pixels += img.width * img.height
    return len(frames), pixels


def run_peer(files: list[Path], out: Path, level: int) -> dict:
    out.mkdir(parents=True)
    images = failed = pixels = 0
    cpu0, start = cpu_seconds(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, path in enumerate(files):
            try:
                n, px = _peer_file(path, out, f"{i:07d}", level)
                images += n
                pixels += px
            except Exception:  # the peer has no error handling beyond this: a failure is a skipped file
                failed += 1
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    return {
        "method": f"peer loop (PNG level {level})", "workers": 1, "files": len(files), "images": images,
        "failed": failed, "duplicates": 0, "seconds": round(seconds, 3),
        "files_per_s": round(len(files) / seconds, 2), "images_per_s": round(images / seconds, 2),
        "wall_seconds": round(seconds, 3), "bytes_out": sum(p.stat().st_size for p in out.iterdir()),
        "mpix_out": round(pixels / 1e6, 2), "cpu_seconds": round(cpu, 3),
    }


# ------------------------------------------------------------------------------------------ reporting


def core_hours(images_per_s_per_core: float) -> float | None:
    return 1e8 / images_per_s_per_core / 3600 if images_per_s_per_core > 0 else None


def finish_row(row: dict, corpus: str) -> dict:
    row["corpus"] = corpus
    wall_ips = row["images"] / row["wall_seconds"] if row["wall_seconds"] > 0 else 0.0
    row["wall_files_per_s"] = round(row["files"] / row["wall_seconds"], 2) if row["wall_seconds"] > 0 else 0.0
    row["wall_images_per_s"] = round(wall_ips, 2)
    row["images_per_s_per_core"] = round(wall_ips / row["workers"], 2)
    ch = core_hours(wall_ips / row["workers"])
    row["core_hours_100M"] = round(ch) if ch is not None else None
    row["images_per_cpu_s"] = round(row["images"] / row["cpu_seconds"], 2) if row["cpu_seconds"] > 0 else 0.0
    ch = core_hours(row["images_per_cpu_s"])
    row["core_hours_100M_cpu"] = round(ch) if ch is not None else None
    return row


def total_rows(rows: list[dict]) -> list[dict]:
    """One 'all corpora' row per method and worker count: summed files, images and times."""
    keys = []
    for r in rows:
        k = (r["method"], r["workers"])
        if k not in keys:
            keys.append(k)
    out = []
    for method, workers in keys:
        rs = [r for r in rows if (r["method"], r["workers"]) == (method, workers)]
        row = {"method": method, "workers": workers}
        for f in ("files", "images", "failed", "duplicates", "bytes_out", "mpix_out", "cpu_seconds"):
            row[f] = round(sum(r[f] for r in rs), 2)
        row["seconds"] = round(sum(r["seconds"] for r in rs), 3)
        row["wall_seconds"] = round(sum(r["wall_seconds"] for r in rs), 3)
        row["files_per_s"] = round(row["files"] / row["seconds"], 2)
        row["images_per_s"] = round(row["images"] / row["seconds"], 2)
        out.append(finish_row(row, "all"))
    return out


def markdown_table(rows: list[dict]) -> str:
    head = ("| corpus | method | workers | files | images | failed / dup | processing s | files/s | images/s "
            "| end-to-end s | files/s | images/s | images/s/worker | core-h per 100M | CPU s | images/CPU-s "
            "| core-h per 100M (CPU) | Mpixel out | MB out |")
    lines = [head, "| --- | --- |" + " ---: |" * 17]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['workers']} | {r['files']} | {r['images']} "
            f"| {r['failed']} / {r['duplicates']} | {r['seconds']:.2f} | {r['files_per_s']:.1f} "
            f"| {r['images_per_s']:.1f} | {r['wall_seconds']:.2f} | {r['wall_files_per_s']:.1f} "
            f"| {r['wall_images_per_s']:.1f} | {r['images_per_s_per_core']:.1f} | {r['core_hours_100M']:,} "
            f"| {r['cpu_seconds']:.2f} | {r['images_per_cpu_s']:.1f} | {r['core_hours_100M_cpu']:,} "
            f"| {r['mpix_out']:.1f} | {r['bytes_out'] / 1e6:.1f} |")
    return "\n".join(lines)


def machine_info() -> dict:
    return machine_facts(("pydicom", "pillow", "numpy", "pylibjpeg", "zstandard", "lz4", "imagecodecs"))


def print_machine(info: dict) -> None:
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable of {info['logical_cores']} logical cores, "
          f"{info['ram_gib']} GiB RAM, {info['os']}")
    print(f"software: python {info['python']}, " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"load average at start (1/5/15 min): {info['load_average_at_start']}")


# --------------------------------------------------------------------------------------- format study


def stored_images(shard_dir: Path, limit: int) -> list[np.ndarray]:
    """The uint16 images our ingest stored, straight from its shards."""
    out = []
    for shard in sorted(shard_dir.glob("*.tar")):
        for s in read_shard(shard):
            store = s.meta["intensity"]["store"]  # back from values to the stored integers, whatever the format
            out.append(np.rint((decode_pixels(s.pixels, s.meta) - store["offset"]) / store["scale"]).astype(np.uint16))
            if len(out) >= limit:
                return out
    return out


def _png(level: int):
    def encode(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()

    def decode(b: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(b)))

    return encode, decode


def _npy_encode(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_decode(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def _adaptive_encode(a: np.ndarray) -> bytes:
    """8-bit PNG of level indices plus the level table when the image has at most 256 distinct values
    (e.g. an 8-bit source scaled to [0, 1]), else 16-bit PNG: lossless either way."""
    levels, index = np.unique(a, return_inverse=True)
    if len(levels) > 256:
        return b"P16" + _png(PNG_COMPRESS_LEVEL)[0](a)
    buf = io.BytesIO()
    Image.fromarray(index.reshape(a.shape).astype(np.uint8)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    table = levels.astype("<u2").tobytes()  # would live in the sample's JSON
    return b"P08" + len(table).to_bytes(2, "little") + table + buf.getvalue()


def _adaptive_decode(b: bytes) -> np.ndarray:
    if b[:3] == b"P16":
        return _png(PNG_COMPRESS_LEVEL)[1](b[3:])
    n = int.from_bytes(b[3:5], "little")
    levels = np.frombuffer(b[5:5 + n], dtype="<u2")
    return levels[np.asarray(Image.open(io.BytesIO(b[5 + n:])))]


# --- issue 12 candidates: the stored uint16 image compressed as bytes, or an image codec's lossless mode.
# Raw formats carry the shape in an 8-byte header (in a shard it would live in the sample's JSON).


def _byte_planes(a: np.ndarray) -> bytes:
    """All low bytes, then all high bytes: the high bytes of medical images vary slowly and compress well."""
    return a.astype("<u2", copy=False).view(np.uint8).reshape(-1, 2).T.tobytes()


def _from_byte_planes(raw: bytes, shape: tuple[int, int]) -> np.ndarray:
    planes = np.frombuffer(raw, np.uint8).reshape(2, -1)
    pairs = np.empty((planes.shape[1], 2), np.uint8)
    pairs[:, 0], pairs[:, 1] = planes[0], planes[1]
    return pairs.view("<u2").reshape(shape)


def _delta(a: np.ndarray) -> np.ndarray:
    """Each pixel minus its left neighbour, modulo 2**16 (uint16 arithmetic wraps): lossless."""
    d = a.copy()
    d[:, 1:] -= a[:, :-1]
    return d


def _undelta(d: np.ndarray) -> np.ndarray:
    return np.cumsum(d, axis=1, dtype=np.uint16)  # wraps the same way back


PRE_FILTERS = {  # name -> (uint16 image -> bytes, (bytes, shape) -> uint16 image)
    "": (lambda a: a.astype("<u2", copy=False).tobytes(), lambda raw, shape: np.frombuffer(raw, "<u2").reshape(shape)),
    "byte planes": (_byte_planes, _from_byte_planes),
    "delta + byte planes": (lambda a: _byte_planes(_delta(a)),
                            lambda raw, shape: _undelta(_from_byte_planes(raw, shape))),
}


def _raw(pre_filter: str, compress, decompress):
    to_bytes, from_bytes = PRE_FILTERS[pre_filter]

    def encode(a: np.ndarray) -> bytes:
        return struct.pack("<II", *a.shape) + compress(to_bytes(a))

    def decode(b: bytes) -> np.ndarray:
        return from_bytes(decompress(b[8:]), struct.unpack("<II", b[:8]))

    return encode, decode


def _zstd(level: int):
    import zstandard

    return zstandard.ZstdCompressor(level=level).compress, zstandard.ZstdDecompressor().decompress


def _lz4():
    import lz4.frame

    return lz4.frame.compress, lz4.frame.decompress


def _imagecodecs(name: str, **options):
    """imagecodecs' ``<name>_encode``/``_decode``; one thread where the codec takes a thread count."""
    import imagecodecs

    encoder, decoder = getattr(imagecodecs, f"{name}_encode"), getattr(imagecodecs, f"{name}_decode")
    threads = {"numthreads": 1} if name in ("jpegxl", "jpeg2k") else {}
    return lambda a: encoder(a, **options, **threads), lambda b: decoder(b, **threads)


def _labelled(pre_filter: str, codec: str) -> str:
    return f"raw uint16, {pre_filter}, {codec}" if pre_filter else f"raw uint16, {codec}"


CANDIDATES = {  # label -> codec factory (called by candidate_formats, which skips what cannot run here)
    **{_labelled(f, f"zstd {lv}"): (lambda f=f, lv=lv: _raw(f, *_zstd(lv)))
       for f in PRE_FILTERS for lv in (1, 3, 9, 19)},
    **{_labelled(f, "lz4 frame (default level)"): (lambda f=f: _raw(f, *_lz4())) for f in PRE_FILTERS},
    "JPEG-XL lossless, effort 1": lambda: _imagecodecs("jpegxl", lossless=True, effort=1),
    "JPEG-XL lossless, effort 3": lambda: _imagecodecs("jpegxl", lossless=True, effort=3),
    "JPEG-LS lossless": lambda: _imagecodecs("jpegls", level=0),  # level = NEAR; 0 is lossless
    "JPEG 2000 reversible (OpenJPEG)": lambda: _imagecodecs("jpeg2k", reversible=True),
    "HTJ2K reversible (OpenJPH)": lambda: _imagecodecs("htj2k", reversible=True),
    "QOI": lambda: _imagecodecs("qoi"),
    "WebP lossless": lambda: _imagecodecs("webp", lossless=True),
}


def candidate_formats() -> tuple[dict, list[str]]:
    """(label -> (encode, decode) for the candidates that round-trip a small uint16 image here,
    [why each other one is skipped]). A missing package or codec, or no 16-bit support, is a skip."""
    probe = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000) ^ 0x0F0F  # both bytes vary
    found, skipped = {}, []
    for label, factory in CANDIDATES.items():
        try:
            encode, decode = factory()
            back = decode(encode(probe))
        except Exception as e:  # ImportError, or the codec refuses uint16 / is not in this build
            skipped.append(f"{label}: {type(e).__name__}: {e}")
            continue
        if back.dtype != probe.dtype or not np.array_equal(back, probe):
            skipped.append(f"{label}: not lossless on a uint16 probe image")
            continue
        found[label] = (encode, decode)
    return found, skipped


PNG_OURS = f"16-bit PNG, compress_level {PNG_COMPRESS_LEVEL} (ours)"  # the reference of the issue 12 summary
# Issue 12's bar for adopting a format: decodes this many times faster than PNG_OURS, at most this many times its bytes.
BAR_DECODE_SPEEDUP, BAR_SIZE_RATIO = 4.0, 1.25

FORMATS = {
    PNG_OURS: _png(PNG_COMPRESS_LEVEL),
    f"16-bit PNG, compress_level {PILLOW_DEFAULT_LEVEL} (Pillow default)": _png(PILLOW_DEFAULT_LEVEL),
    "raw uint16 .npy": (_npy_encode, _npy_decode),
    f"alternative: 8-bit PNG + level table if <= 256 levels, else 16-bit (level {PNG_COMPRESS_LEVEL})":
        (_adaptive_encode, _adaptive_decode),
}


def format_study(images: list[np.ndarray], formats: dict, repeats: int) -> list[dict]:
    """Encode every image once per format; decode them ``repeats`` times, round-robin over the formats
    (a burst of other load then hits all alike), and keep each format's fastest decode pass."""
    raw = sum(a.nbytes for a in images)
    few_levels = sum(len(np.unique(a)) <= 256 for a in images)
    print(f"  format study: {len(images)} stored images, {few_levels} of them with <= 256 distinct values")
    blobs, encode_s, decode_s = {}, {}, {name: float("inf") for name in formats}
    for name, (encode, _) in formats.items():
        t0 = time.perf_counter()
        blobs[name] = [encode(a) for a in images]
        encode_s[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, (_, decode) in formats.items():
            t0 = time.perf_counter()
            decoded = [decode(b) for b in blobs[name]]
            decode_s[name] = min(decode_s[name], time.perf_counter() - t0)
            # Same values, shape and dtype: a codec that silently went lossy (or to another dtype) fails here.
            assert all(d.dtype == a.dtype and np.array_equal(a, d) for a, d in zip(images, decoded)), \
                f"{name} is not lossless"
    return [study_row(name, len(images), few_levels, sum(len(b) for b in blobs[name]), raw, encode_s[name],
                      decode_s[name])
            for name in formats]


def study_row(name: str, images: int, few_levels: int, size: int, raw: int, encode_s: float, decode_s: float) -> dict:
    return {"format": name, "images": images, "few_levels": few_levels, "bytes": size, "raw_bytes": raw,
            "encode_s": encode_s, "decode_s": decode_s, "bytes_per_image": round(size / images),
            "vs_raw": round(size / raw, 3), "encode_ms": round(1e3 * encode_s / images, 3),
            "decode_ms": round(1e3 * decode_s / images, 3)}


def overall_study(per_corpus: list[list[dict]]) -> list[dict]:
    """One row per format over all corpora: summed bytes and times, so every image weighs the same."""
    rows = []
    for name in [r["format"] for r in per_corpus[0]]:
        rs = [r for rows_ in per_corpus for r in rows_ if r["format"] == name]
        rows.append(study_row(name, *(sum(r[k] for r in rs) for k in ("images", "few_levels", "bytes", "raw_bytes",
                                                                         "encode_s", "decode_s"))))
    return rows


def format_table(corpus: str, rows: list[dict]) -> str:
    lines = ["| corpus | format | images | bytes/image | size vs raw | encode ms/image | decode ms/image |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {corpus} | {r['format']} | {r['images']} | {r['bytes_per_image']:,} | {r['vs_raw']:.2f} "
              f"| {r['encode_ms']:.2f} | {r['decode_ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def against_png(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """format -> (bytes / PNG level 1's bytes, PNG level 1's decode time / its decode time)."""
    png = next(r for r in rows if r["format"] == PNG_OURS)
    return {r["format"]: (r["bytes"] / png["bytes"], png["decode_s"] / r["decode_s"]) for r in rows}


def versus_png_table(studies: dict[str, list[dict]]) -> str:
    """Size ratio and decode speed-up against 16-bit PNG level 1, per corpus; a check mark where a format
    meets issue 12's bar (decodes >= 4x faster at <= 1.25x the bytes)."""
    ratios = {corpus: against_png(rows) for corpus, rows in studies.items()}
    names = [r["format"] for r in next(iter(studies.values()))]
    lines = ["| format | " + " | ".join(f"{c}: bytes vs PNG, decode speed-up" for c in studies) + " |",
             "| --- |" + " ---: |" * len(studies)]
    for name in names:
        cells = []
        for corpus in studies:
            size, speed = ratios[corpus][name]
            mark = " ✓" if speed >= BAR_DECODE_SPEEDUP and size <= BAR_SIZE_RATIO else ""
            cells.append(f"{size:.2f}x, {speed:.1f}x{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="core-hours for 100M images = 1e8 / (end-to-end images/s per worker) / 3600, "
                                       "and = 1e8 / (images per CPU-second) / 3600")
    p.add_argument("--corpora", nargs="+", choices=ALL_CORPORA, default=list(ALL_CORPORA),
                   help="corpora to measure (default: all that are present)")
    p.add_argument("--shared-data", type=Path, default=SHARED_DATA,
                   help=f"folder holding {', '.join(SHARED_CORPORA)} (default: {SHARED_DATA})")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N files per corpus, taken at an even stride (default: all files)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts for ours (default: 1 2)")
    p.add_argument("--peer-levels", type=int, nargs="+", default=[PILLOW_DEFAULT_LEVEL, PNG_COMPRESS_LEVEL],
                   help="PNG compress levels for the peer loop (default: Pillow's default 6, and ours 1)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="run every measurement N times (round-robin) and keep each one's fastest (default: 1)")
    p.add_argument("--format-study", action="store_true",
                   help="also compare 16-bit PNG (ours) with PNG at the default level, raw .npy, raw uint16 + "
                        "zstd/lz4 (with byte-plane and delta pre-filters) and imagecodecs' lossless codecs")
    p.add_argument("--format-samples", type=int, default=300, metavar="N",
                   help="images per corpus for the format study (default: 300)")
    p.add_argument("--format-repeats", type=int, default=3, metavar="N",
                   help="format study: decode every format's images N times, round-robin, keep the fastest "
                        "(encode runs once; default: 3)")
    p.add_argument("--tmp", type=Path, default=None, help="where temporary outputs go (default: system temp)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also save all results as JSON")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.repeats < 1 or args.format_repeats < 1:
        p.error("--repeats and --format-repeats must be at least 1")
    if any(w < 1 for w in args.workers):
        p.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    info = machine_info()
    print(f"command: {command}")
    print_machine(info)
    found = corpora(args.corpora, args.shared_data, args.limit)
    if not found:
        print("no corpus found; nothing to measure", file=sys.stderr)
        return 1

    rows: list[dict] = []
    study: dict[str, dict] = {}
    formats, skipped = {}, []
    if args.format_study:
        candidates, skipped = candidate_formats()
        formats = {**FORMATS, **candidates}
    with tempfile.TemporaryDirectory(prefix="medssl-bench-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        salt = tmp / "salt"
        salt.write_text("benchmark-salt-0123456789abcdef")  # never touch the user's ~/.medssl/salt
        for name, (inputs, files) in found.items():
            size = warm_cache(files)
            print(f"\n{name}: {len(files)} files, {size / 1e6:.1f} MB")
            # Repeats go round-robin over the methods so that a burst of load from other programs hits
            # them alike; each method keeps its fastest (end-to-end) repeat.
            keep = tmp / f"{name}-ours-{args.workers[0]}-0"  # shards for the format study
            runs = [(f"ours, {w} worker(s)", lambda out, w=w: run_ours(inputs, len(files), w, out, salt), f"ours-{w}")
                    for w in args.workers]
            runs += [(f"peer, PNG level {lv}", lambda out, lv=lv: run_peer(files, out, lv), f"peer-{lv}")
                     for lv in args.peer_levels]
            best: dict[str, dict] = {}
            walls: dict[str, list[float]] = {label: [] for label, _, _ in runs}
            for r in range(args.repeats):
                for label, fn, tag in runs:
                    out = tmp / f"{name}-{tag}-{r}"
                    row = fn(out)
                    if out != keep:
                        shutil.rmtree(out)
                    walls[label].append(row["wall_seconds"])
                    print(f"  {label}, repeat {r + 1}: {row['images']} images in {row['wall_seconds']:.2f} s "
                          f"({row['images'] / row['wall_seconds']:.1f} images/s, {row['cpu_seconds']:.1f} CPU s), "
                          f"{row['failed']} failed")
                    if label not in best or row["wall_seconds"] < best[label]["wall_seconds"]:
                        best[label] = row
            for label, _, _ in runs:
                rows.append(finish_row({**best[label], "repeats": args.repeats, "wall_seconds_all": walls[label]},
                                       name))
            first_ours = best[runs[0][0]]
            if args.format_study:
                kept = keep / "shards"
                images = stored_images(kept, args.format_samples)
                if images:
                    study[name] = {"source_bytes_per_file": round(size / len(files)),
                                   "stored_bytes_per_image": round(first_ours["bytes_out"]
                                                                   / max(1, first_ours["images"])),
                                   "rows": format_study(images, formats, args.format_repeats)}
        rows_all = rows + (total_rows(rows) if len(found) > 1 else [])

    print("\n## Ingest throughput\n")
    print(f"command: `{command}`\n")
    print(markdown_table(rows_all))
    print("\ncore-h per 100M = 1e8 / (end-to-end images/s / workers) / 3600; the (CPU) variant uses images per "
          "CPU-second instead (process + worker CPU time: steadier when the machine is shared). Processing = the "
          "ingest report's throughput (scan + hash excluded); end to end = wall time of the whole ingest() call.")
    if study:
        print("\n## Shard format study (images as stored by our ingest)\n")
        for name, st in study.items():
            print(format_table(name, st["rows"]))
            print(f"\n{name}: source files average {st['source_bytes_per_file']:,} bytes; our shards hold "
                  f"{st['stored_bytes_per_image']:,} bytes per image (PNG + JSON + tar headers).\n")
        studies = {name: st["rows"] for name, st in study.items()}
        if len(studies) > 1:
            study["all"] = {"rows": overall_study(list(studies.values()))}
            studies["all"] = study["all"]["rows"]
            print(format_table("all", studies["all"]))
        print("\n### Against 16-bit PNG level 1 (bytes ratio, decode speed-up; ✓: >= 4x faster at <= 1.25x bytes)\n")
        print(versus_png_table(studies))
        if skipped:
            print("\nskipped:\n" + "\n".join(f"- {why}" for why in skipped))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": info, "rows": rows_all,
                                         "format_study": study, "format_skipped": skipped}, indent=1))
        print(f"results saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
