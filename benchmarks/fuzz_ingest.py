#!/usr/bin/env python
"""Fuzz ``medssl ingest`` through its real command line with mutated medical images.

Inputs are mutated from real seeds: pydicom's own test files (many transfer syntaxes: RLE, JPEG,
JPEG-LS, JPEG 2000, deflate, big endian, multi-frame), the files of pydicom-data that are installed
(nothing is downloaded), and PNG / JPEG / TIFF / NIfTI seeds generated here. Mutators:

- ``bytes``: byte flips, inserts, deletes, interesting values, zeroed and repeated ranges;
- ``truncate``: the file cut at a random point;
- ``dicom_field``: header fields set to absurd values with pydicom (Rows 0 / 65535, NumberOfFrames
  "-3", BitsAllocated 33, RescaleSlope NaN, PixelSpacing NaN, a private SOP Class UID, ...), and
  required elements deleted;
- ``dicom_tsuid``: the file meta's Transfer Syntax UID swapped, the data set left as it is;
- ``dicom_stream``: encapsulated fragments, the offset table, a deflated body or native pixel data
  corrupted;
- ``png_chunk``, ``jpeg_marker``, ``tiff_ifd``, ``nifti_header``, ``gz_stream``: structure-aware
  corruption of the compressed streams and headers of those formats (PNG CRCs recomputed so that the
  zlib stream itself is what is broken);
- ``bomb``: tiny files declaring huge images (PNG / TIFF / JPEG / DICOM / NIfTI) and real
  decompression bombs (PNG and TIFF deflate, a deflated DICOM, a .nii.gz);
- ``nonimage`` and ``special``: text, archives, magic numbers without content; FIFOs, symlinks to
  /dev/zero, dangling and looping symlinks, unreadable files and folders;
- ``copy``: an unmodified seed (a control).

Some inputs get odd names (spaces, ``|``, newlines, bytes that are not UTF-8, terminal escapes).
Some header fields carry canary values: a reason that quotes one is a header-value leak.

The mutants are written into batch folders of ``--batch`` entries and each folder is ingested by
``medssl ingest FOLDER --out OUT --workers W --quiet`` under a wall-clock limit. Per run: a crash
(a traceback, an exit status other than 0 and 1, a kill, or no manifest), a hang (the time limit
hit), every input's manifest rows (exactly one is expected), status and reason codes,
``internal_error`` rows, header-value leaks, outputs that are not strict JSON (NaN), wall time, and
peak memory: the largest process of the CLI's process tree (``wait4``) and, when report.json has an
``isolation`` section, the ingest's own worker peak and budget. A crashed or hung batch is split in
halves and rerun until the inputs responsible are found (``--no-isolate`` turns it off). Offending
inputs are saved under ``OUT/findings`` for reproduction; ``OUT/summary.json`` holds everything.

Deterministic from ``--seed`` for given seed files and library versions. Exit status: 0 when nothing
was found, 1 when anything was (crash, hang, missing row, internal_error, leak, invalid JSON, memory
over budget), 2 for a usage error.

Run from the repository root (``--set`` goes to every ``medssl ingest`` run: a per-file time limit well
under ``--timeout``, so that a decoder that never returns shows as a ``timeout`` row and not as a hung
run; work units smaller than a batch, so that every worker gets a share of it):
  .venv/bin/python benchmarks/fuzz_ingest.py --out fuzz-10k --set file_timeout_s=30 --set files_per_chunk=50
  .venv/bin/python benchmarks/fuzz_ingest.py --inputs 300 --batch 150 --out fuzz-300 --set file_timeout_s=30 \
      --set files_per_chunk=50                                     # what tests/test_fuzz_ingest.py runs
  .venv/bin/python benchmarks/fuzz_ingest.py --seed 0 --start 500 --inputs 100 --out again ...  # inputs 500-599
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import math
import os
import random
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medssl.machine import machine_facts

REPO = Path(__file__).resolve().parents[1]

# Canary header values: a rejection reason that contains one quotes a header value.
CANARY_TEXT = "FUZZCANARY"
CANARY_UID = "1.2.826.0.1.3680043.9.7777.424242424242"
CANARIES = (CANARY_TEXT, "424242424242")


# =============================================================================================== seeds


@dataclass(frozen=True)
class Seed:
    name: str      # where it came from, e.g. "pydicom:MR_small_RLE.dcm"
    kind: str      # dicom | png | jpeg | tiff | nifti | nifti_gz | gzip | other
    path: Path
    data: bytes
    pixels: bool = True  # False for DICOM without (little-endian) pixel data: DICOMDIRs, reports, plans

    @property
    def weight(self) -> float:
        """How often it is picked within its kind: most of pydicom's dicomdirtests hold no pixel data."""
        return 1.0 if self.pixels else 0.25

    @property
    def family(self) -> str:
        return {"png": "raster", "jpeg": "raster", "tiff": "raster", "nifti_gz": "nifti", "gzip": "other"}.get(
            self.kind, self.kind)

    @property
    def suffix(self) -> str:
        return "".join(self.path.suffixes[-2:]) if self.kind == "nifti_gz" else self.path.suffix


def sniff(data: bytes, name: str) -> str:
    """The seed's kind from its bytes (its name only for DICOM written without a preamble)."""
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if _nifti_endian(data) or _is_nifti2(data):
        return "nifti"
    if data.startswith(b"\x1f\x8b"):
        try:
            inner = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return "gzip"
        return "nifti_gz" if _nifti_endian(inner) else "gzip"
    if name.endswith(".dcm") or name.startswith("DICOMDIR"):
        return "dicom"
    return "other"


def installed_seed_files() -> list[tuple[str, Path]]:
    """pydicom's test files and the pydicom-data files present on disk (nothing is downloaded)."""
    import pydicom

    found = []
    test_files = Path(pydicom.__file__).parent / "data" / "test_files"
    found += [(f"pydicom:{p.relative_to(test_files)}", p) for p in sorted(test_files.rglob("*")) if p.is_file()]
    try:
        import data_store
    except ImportError:
        print("pydicom-data is not installed: its files are not used as seeds", file=sys.stderr)
    else:
        store = Path(data_store.__file__).parent / "data"
        found += [(f"pydicom-data:{p.relative_to(store)}", p) for p in sorted(store.rglob("*")) if p.is_file()]
    return found


def generate_seeds(folder: Path) -> list[tuple[str, Path]]:
    """Small valid PNG / JPEG / TIFF / NIfTI files of the shapes and types an archive holds."""
    import nibabel as nib
    import numpy as np
    import tifffile
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :64]
    blob = ((yy - 24) ** 2 + (xx - 30) ** 2 < 200).astype(np.float64)
    grey8 = np.clip(40 + 150 * blob + rng.normal(0, 12, blob.shape), 0, 255).astype(np.uint8)
    grey16 = (grey8.astype(np.uint16) * 200 + rng.integers(0, 200, blob.shape)).astype(np.uint16)
    rgb8 = np.stack([grey8, 255 - grey8, np.roll(grey8, 5, axis=1)], axis=-1)

    def save(name, arr, mode=None, **kw):  # Pillow: PNG or JPEG from the name
        img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
        img.save(folder / name, **kw)

    save("grey8.png", grey8)
    save("grey16.png", grey16)
    save("rgb8.png", rgb8)
    save("rgba8.png", rgb8, "RGBA")
    save("palette.png", rgb8, "P")
    save("bilevel.png", grey8, "1")
    save("grey_alpha.png", grey8, "LA")
    save("grey8.jpg", grey8, quality=90)
    save("rgb8.jpg", rgb8, quality=90)
    save("rgb8_progressive.jpg", rgb8, quality=80, progressive=True)
    save("cmyk.jpg", rgb8, "CMYK")
    tifffile.imwrite(folder / "grey8.tif", grey8)
    tifffile.imwrite(folder / "grey16.tif", grey16)
    tifffile.imwrite(folder / "int16.tif", (grey16.astype(np.int32) - 20000).astype(np.int16))
    tifffile.imwrite(folder / "rgb8.tif", rgb8, photometric="rgb")
    tifffile.imwrite(folder / "rgb8_planar.tif", np.moveaxis(rgb8, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(folder / "float32.tif", grey16.astype(np.float32) / 7.0)
    tifffile.imwrite(folder / "float32_extreme.tif", np.where(blob > 0, 3e38, -3e38).astype(np.float32))
    tifffile.imwrite(folder / "pages16.tif", np.stack([grey16 // (k + 1) for k in range(5)]))
    tifffile.imwrite(folder / "five_channels.tif", rng.integers(0, 255, (16, 16, 5), dtype=np.uint8),
                     photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(folder / "deflate16.tif", grey16, compression="zlib")
    tifffile.imwrite(folder / "tiled16.tif", grey16[:32, :48], tile=(16, 16))
    ct = (np.where(blob > 0, 40, -1000)[..., None] + rng.normal(0, 10, (48, 64, 6))).astype(np.int16)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(rng.random((16, 16)).astype(np.float32), np.eye(4)), folder / "flat2d.nii")
    nib.save(nib.Nifti1Image(ct, affine), folder / "ct3d.nii")
    nib.save(nib.Nifti1Image((rng.random((32, 24, 5)) * 255).astype(np.uint8), affine), folder / "mr3d_u8.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((12, 10, 4, 3)).astype(np.float32), affine), folder / "fmri4d.nii.gz")
    scaled = nib.Nifti1Image(ct, affine)
    scaled.header.set_slope_inter(0.5, -10)
    nib.save(scaled, folder / "ct3d_scaled.nii.gz")
    oblique = affine.copy()
    oblique[:3, :3] = [[0, 0, 2.5], [0.8, 0, 0], [0, -0.8, 0]]
    nib.save(nib.Nifti1Image(ct, oblique), folder / "ct3d_oblique.nii")
    nib.save(nib.Nifti2Image(ct, affine), folder / "ct3d_nifti2.nii")
    return [(f"generated:{p.name}", p) for p in sorted(folder.iterdir())]


def load_seeds(seed_folder: Path) -> list[Seed]:
    seeds = []
    for name, path in installed_seed_files() + generate_seeds(seed_folder):
        data = path.read_bytes()
        if not data:
            continue
        kind = sniff(data, path.name)
        seeds.append(Seed(name, kind, path, data, kind != "dicom" or _find_pixel_data(data) is not None))
    return seeds


# ================================================================================= format helpers

# ---------------------------------------------------------------------------------------- DICOM

_EXPLICIT_LE, _DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"  # transfer syntax UIDs
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


def dicom_element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element (value padded to even length)."""
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB", b"UN") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _meta_elements(data: bytes) -> tuple[list[tuple[int, bytes, bytes]], int] | None:
    """The file meta group of a Part-10 file: ([(element, VR, value)], offset where the data set starts)."""
    if data[128:132] != b"DICM":
        return None
    pos, found = 132, []
    while pos + 8 <= len(data):
        group, elem = struct.unpack("<HH", data[pos:pos + 4])
        if group != 2:
            break
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack("<I", data[pos + 8:pos + 12])
            start = pos + 12
        else:
            (length,) = struct.unpack("<H", data[pos + 6:pos + 8])
            start = pos + 8
        if start + length > len(data):
            return None
        found.append((elem, vr, data[start:start + length]))
        pos = start + length
    return found, pos


def meta_group(elements: list[tuple[int, bytes, bytes]]) -> bytes:
    body = b"".join(dicom_element(2, e, vr, v) for e, vr, v in sorted(elements) if e != 0)
    return dicom_element(2, 0, b"UL", struct.pack("<I", len(body))) + body


def with_meta_uid(data: bytes, elem: int, uid: str) -> bytes | None:
    """The file with the UID of file meta element (0002,elem) replaced; the data set's bytes unchanged."""
    parsed = _meta_elements(data)
    if parsed is None:
        return None
    elements, end = parsed
    elements = [(e, vr, v) for e, vr, v in elements if e != elem] + [(elem, b"UI", uid.encode())]
    return data[:132] + meta_group(elements) + data[end:]


def _find_pixel_data(data: bytes) -> tuple[int, int] | None:
    """(offset of the value, value length or -1 if undefined) of the last (7FE0,0010) element."""
    tag = b"\xe0\x7f\x10\x00"
    pos = data.rfind(tag)
    while pos >= 0:
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW") and data[pos + 6:pos + 8] == b"\0\0":
            (length,) = struct.unpack("<I", data[pos + 8:pos + 12])
            return pos + 12, (-1 if length == 0xFFFFFFFF else length)
        if len(data) >= pos + 8:
            (length,) = struct.unpack("<I", data[pos + 4:pos + 8])
            if length == 0xFFFFFFFF or pos + 8 + length <= len(data):
                return pos + 8, (-1 if length == 0xFFFFFFFF else length)
        pos = data.rfind(tag, 0, pos)
    return None


def encapsulated_items(data: bytes, start: int) -> list[tuple[int, int]]:
    """(header offset, value length) of each item of encapsulated pixel data, the offset table first."""
    items, pos = [], start
    while pos + 8 <= len(data) and data[pos:pos + 4] == b"\xfe\xff\x00\xe0":
        (length,) = struct.unpack("<I", data[pos + 4:pos + 8])
        items.append((pos, length))
        pos += 8 + length
    return items


# ------------------------------------------------------------------------------------------ PNG


def png_chunks(data: bytes) -> list[list] | None:
    """[[type, data], ...] of a PNG, or None if the chunk structure does not parse."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    chunks, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if pos + 12 + length > len(data):
            return None
        chunks.append([kind, data[pos + 8:pos + 8 + length]])
        pos += 12 + length
        if kind == b"IEND":
            break
    return chunks or None


def png_bytes(chunks: list[list]) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def ihdr(width: int, height: int, bit_depth: int = 8, colour: int = 0) -> list:
    return [b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)]


# ----------------------------------------------------------------------------------------- TIFF

_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4)}  # SHORT, LONG: the types whose values we rewrite


def tiff_bytes(width: int, height: int, strip: bytes, bits: int = 8, compression: int = 1) -> bytes:
    """A classic little-endian one-strip grey TIFF with the given declared size."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, compression), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        fmt = "<HHI" + ("HH" if kind == 3 else "I")
        ifd += struct.pack(fmt, tag, kind, 1, *((value, 0) if kind == 3 else (value,)))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip


def tiff_first_ifd(data: bytes) -> tuple[str, int, int] | None:
    """(struct byte order, IFD offset, number of entries) of a classic TIFF."""
    if data[:4] == b"II*\x00":
        order = "<"
    elif data[:4] == b"MM\x00*":
        order = ">"
    else:
        return None
    (offset,) = struct.unpack(order + "I", data[4:8])
    if offset + 2 > len(data):
        return None
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    if offset + 2 + 12 * count + 4 > len(data):
        return None
    return order, offset, count


# ---------------------------------------------------------------------------------------- NIfTI

# NIfTI-1 header fields: name -> (offset, struct format)
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "i"), "dim": (40, "8h"), "intent_code": (68, "h"), "datatype": (70, "h"),
    "bitpix": (72, "h"), "pixdim": (76, "8f"), "vox_offset": (108, "f"), "scl_slope": (112, "f"),
    "scl_inter": (116, "f"), "cal_max": (124, "f"), "cal_min": (128, "f"), "qform_code": (252, "h"),
    "sform_code": (254, "h"), "quatern": (256, "6f"), "srow": (280, "12f"), "magic": (344, "4s"),
}


def _nifti_endian(data: bytes) -> str | None:
    """Byte order of a NIfTI-1 header, None for anything else (NIfTI-2 included)."""
    if len(data) < 348:
        return None
    for order in "<>":
        if struct.unpack(order + "i", data[:4])[0] == 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
            return order
    return None


def _is_nifti2(data: bytes) -> bool:
    return len(data) >= 540 and data[4:8] in (b"n+2\x00", b"ni2\x00")


def nifti_header(dims: tuple[int, ...], datatype: int = 16, bitpix: int = 32) -> bytes:
    """A NIfTI-1 single-file header (352 bytes with the extension flag) declaring ``dims``."""
    head = bytearray(352)
    struct.pack_into("<i", head, 0, 348)
    struct.pack_into("<8h", head, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", head, 70, datatype, bitpix)
    struct.pack_into("<8f", head, 76, 1, *([1.0] * 7))
    struct.pack_into("<ff", head, 108, 352.0, 1.0)
    struct.pack_into("<h", head, 254, 1)
    struct.pack_into("<12f", head, 280, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)
    head[344:348] = b"n+1\x00"
    return bytes(head)


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def compressed_zeros(n: int, wbits: int) -> bytes:
    """``n`` zero bytes deflated (raw for wbits -15, zlib-wrapped for 15, gzip for 31), streamed."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block, parts = bytes(1 << 24), []
    left = n
    while left > 0:
        parts.append(c.compress(block[:min(left, len(block))]))
        left -= len(block)
    parts.append(c.flush())
    return b"".join(parts)


# ====================================================================================== mutators


@dataclass
class Mutant:
    data: bytes | None        # the file's bytes (None for special entries)
    mutator: str
    detail: str
    seed: str = ""
    suffix: str = ""
    special: str | None = None  # fifo | symlink_dev_zero | ... (see make_special)


def _region_end(rng: random.Random, n: int) -> int:
    """Byte mutations land before this offset: mostly in the headers (the first 4 KiB), else anywhere."""
    return min(n, 4096) if rng.random() < 0.6 else n


_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\xff\x7f", b"\x00\x80",
                b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
                b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x01\x00\x00\x00", b"\x00\x00\x00\x01"]


def byte_ops(rng: random.Random, data: bytes, n_ops: int) -> tuple[bytes, str]:
    buf = bytearray(data)
    done = []
    for _ in range(n_ops):
        if not buf:
            buf += rng.randbytes(rng.randint(1, 64))
            done.append("refill")
            continue
        end = _region_end(rng, len(buf))
        at = rng.randrange(end)
        op = rng.choice(("flip", "flip", "insert", "delete", "interesting", "zero", "repeat"))
        if op == "flip":
            k = rng.randint(1, 16)
            for _ in range(k):
                buf[rng.randrange(end)] ^= rng.randint(1, 255)
            done.append(f"flip{k}@0-{end}")
        elif op == "insert":
            chunk = rng.randbytes(rng.randint(1, 64))
            buf[at:at] = chunk
            done.append(f"insert{len(chunk)}@{at}")
        elif op == "delete":
            k = rng.randint(1, 64)
            del buf[at:at + k]
            done.append(f"delete{k}@{at}")
        elif op == "interesting":
            value = rng.choice(_INTERESTING)
            buf[at:at + len(value)] = value
            done.append(f"set{value.hex()}@{at}")
        elif op == "zero":
            k = min(rng.randint(16, 4096), len(buf) - at)
            buf[at:at + k] = bytes(k)
            done.append(f"zero{k}@{at}")
        else:
            k = rng.randint(16, 4096)
            buf[at:at] = buf[at:at + k]
            done.append(f"repeat{k}@{at}")
    return bytes(buf), ",".join(done)


def mutate_bytes(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    return byte_ops(rng, seed.data, rng.choice((1, 1, 2, 3, 4)))


def mutate_truncate(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    n = len(seed.data)
    where = rng.random()
    if where < 0.3:
        cut = rng.randrange(0, min(n, 1024))
    elif where < 0.5:
        cut = max(0, n - rng.randint(1, 64))
    else:
        cut = rng.randrange(0, n)
    return seed.data[:cut], f"cut at {cut} of {n}"


def mutate_copy(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    return seed.data, "unmodified"


# ------------------------------------------------------------------------------- DICOM header fields

# keyword -> absurd values (pydicom writes them as given: validation is off while mutating)
DICOM_ABSURD: dict[str, list] = {
    "Rows": [0, 1, 30000, 65535], "Columns": [0, 1, 30000, 65535],
    "NumberOfFrames": ["0", "-3", "999999999", "abc", "1.5", "2", "100000"],
    "BitsAllocated": [0, 1, 3, 7, 12, 24, 33, 64, 65535], "BitsStored": [0, 1, 17, 33, 65535],
    "HighBit": [0, 31, 65535], "SamplesPerPixel": [0, 2, 3, 4, 255], "PlanarConfiguration": [1, 2, 255],
    "PixelRepresentation": [1, 2, 255],
    "PhotometricInterpretation": [CANARY_TEXT, "PALETTE COLOR", "YBR_FULL_422", "YBR_RCT", "MONOCHROME1", "RGB", ""],
    "RescaleSlope": ["0", "NaN", "1e308", "-inf", "-1"], "RescaleIntercept": ["NaN", "1e308", "-1e308"],
    "WindowCenter": ["NaN", "1e308", ""], "WindowWidth": ["0", "-1", "NaN", "inf"],
    "PixelSpacing": [["NaN", "NaN"], ["0", "0"], ["-1", "-1"], ["inf", "1"], ["1"]],
    "SOPClassUID": [CANARY_UID], "Modality": ["CT", "MR", "US", "NM", "SEG", "RTDOSE", "XA", ""],
    "PatientName": [CANARY_TEXT], "PatientID": [CANARY_TEXT + "-ID"], "StudyInstanceUID": [CANARY_UID + ".1"],
}
DICOM_DELETABLE = ["Rows", "Columns", "BitsAllocated", "BitsStored", "PixelData", "PhotometricInterpretation",
                   "SamplesPerPixel", "PixelRepresentation", "RedPaletteColorLookupTableData"]
LUT_DESCRIPTORS = ["RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
                   "BluePaletteColorLookupTableDescriptor"]


def _quiet_pydicom() -> None:
    """Let pydicom read and write any value: absurd values are the point here."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def _dicom_write(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def mutate_dicom_field(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(seed.data), force=True)
        done = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            roll = rng.random()
            if roll < 0.12:
                keyword = rng.choice(DICOM_DELETABLE)
                if keyword in ds:
                    del ds[keyword]
                    done.append(f"del {keyword}")
            elif roll < 0.2 and "PixelData" in ds and not ds["PixelData"].is_undefined_length:
                pixels = ds.PixelData
                new = rng.choice((pixels[:len(pixels) // 2], pixels + pixels, b"", pixels[:-1]))
                ds.PixelData = new
                done.append(f"PixelData {len(pixels)}->{len(new)} bytes")
            elif roll < 0.25 and LUT_DESCRIPTORS[0] in ds:
                value = rng.choice(([0, 0, 7], [65535, 0, 16], [256, 0, 33]))
                for keyword in LUT_DESCRIPTORS:
                    setattr(ds, keyword, value)
                done.append(f"palette descriptors={value}")
            elif roll < 0.28 and "VOILUTSequence" in ds and len(ds.VOILUTSequence):
                ds.VOILUTSequence[0].LUTDescriptor = rng.choice(([0, 0, 7], [4096, 0, 33]))
                done.append("VOILUTSequence descriptor")
            else:
                keyword = rng.choice(sorted(DICOM_ABSURD))
                value = rng.choice(DICOM_ABSURD[keyword])
                setattr(ds, keyword, value)
                done.append(f"{keyword}={value!r}")
        return _dicom_write(ds), "; ".join(done) or "no applicable field"


TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                     "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70",
                     "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                     "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.100", CANARY_UID + ".2", ""]


def mutate_dicom_tsuid(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    uid = rng.choice(TRANSFER_SYNTAXES)
    data = with_meta_uid(seed.data, 0x10, uid)  # (0002,0010) Transfer Syntax UID
    if data is None:
        return byte_ops(rng, seed.data, 1)[0], "no file meta; bytes fallback"
    return data, f"TransferSyntaxUID={uid!r}"


def mutate_dicom_stream(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    """Corrupt the pixel stream: encapsulated fragments and offset table, a deflated body, native pixels."""
    data = seed.data
    meta = _meta_elements(data)
    if meta and any(e == 0x10 and v.rstrip(b"\0 ") == _DEFLATED.encode() for e, _, v in meta[0]):
        return data[:meta[1]] + _flip_some(rng, data[meta[1]:]), "deflated body corrupted"
    found = _find_pixel_data(data)
    if found is None:
        return byte_ops(rng, data, 2)[0], "no pixel data found; bytes fallback"
    start, length = found
    if length >= 0:  # native pixel data
        if rng.random() < 0.3:
            length_at = start - 4
            new = rng.choice((0, length * 2, 0xFFFFFFF0, length + 1))
            return data[:length_at] + struct.pack("<I", new) + data[start:], f"native length {length}->{new}"
        end = start + length
        return data[:start] + _flip_some(rng, data[start:end]) + data[end:], "native pixels flipped"
    items = encapsulated_items(data, start)
    if len(items) < 2:
        return data[:start] + _flip_some(rng, data[start:]), "encapsulated without fragments; flipped"
    op = rng.choice(("flip", "flip", "truncate", "length", "offset_table", "drop_delimiter", "duplicate", "drop"))
    k = rng.randrange(1, len(items))
    pos, size = items[k]
    body = pos + 8
    if op == "flip":
        return data[:body] + _flip_some(rng, data[body:body + size]) + data[body + size:], f"fragment {k} flipped"
    if op == "truncate":
        keep = rng.randrange(0, max(1, size))
        return data[:body] + data[body:body + keep] + bytes(size - keep) + data[body + size:], \
            f"fragment {k} zeroed after {keep} of {size}"
    if op == "length":
        new = rng.choice((0, 1, size + 2, 0x7FFFFFFF, 0xFFFFFFF0))
        return data[:pos + 4] + struct.pack("<I", new) + data[body:], f"fragment {k} length {size}->{new}"
    if op == "offset_table":
        table = struct.pack("<" + "I" * 4, *(rng.choice((0, 7, 0x7FFFFFFF, 0xFFFFFFFF)) for _ in range(4)))
        _, old = items[0]
        return data[:items[0][0]] + b"\xfe\xff\x00\xe0" + struct.pack("<I", len(table)) + table + \
            data[items[0][0] + 8 + old:], "offset table replaced with absurd offsets"
    if op == "drop_delimiter":
        end = items[-1][0] + 8 + items[-1][1]
        return data[:end], "sequence delimiter and everything after it removed"
    if op == "duplicate":
        fragment = data[pos:body + size]
        return data[:body + size] + fragment * rng.randint(1, 5) + data[body + size:], f"fragment {k} repeated"
    return data[:pos] + data[body + size:], f"fragment {k} removed"


def _flip_some(rng: random.Random, chunk: bytes) -> bytes:
    if not chunk:
        return chunk
    buf = bytearray(chunk)
    for _ in range(rng.randint(1, 12)):
        buf[rng.randrange(len(buf))] ^= rng.randint(1, 255)
    return bytes(buf)


# ------------------------------------------------------------------------------------- raster / NIfTI


def mutate_png_chunk(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    chunks = png_chunks(seed.data)
    if chunks is None:
        return byte_ops(rng, seed.data, 2)[0], "unparsed PNG; bytes fallback"
    idat = [i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT"]
    op = rng.choice(("idat_flip", "idat_flip", "idat_truncate", "idat_extra", "ihdr", "ihdr", "drop", "bad_crc",
                     "ztxt_bomb", "plte_short"))
    if op.startswith("idat") and idat:
        i = rng.choice(idat)
        body = chunks[i][1]
        if op == "idat_flip":
            chunks[i][1] = body[:2] + _flip_some(rng, body[2:]) if rng.random() < 0.8 else _flip_some(rng, body)
        elif op == "idat_truncate":
            chunks[i][1] = body[:rng.randrange(0, max(1, len(body)))]
        else:
            chunks[i][1] = body + rng.randbytes(rng.randint(1, 200))
        return png_bytes(chunks), f"{op} (CRC fixed)"
    if op == "ihdr" and chunks[0][0] == b"IHDR":
        w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1][:13])
        field_name = rng.choice(("width", "height", "depth", "colour", "comp", "filter", "interlace"))
        values = {"width": [0, 1, 30000, 65535, 2**31 - 1], "height": [0, 1, 30000, 65535, 2**31 - 1],
                  "depth": [0, 3, 7, 16, 32, 255], "colour": [1, 2, 3, 4, 5, 6, 7, 255],
                  "comp": [1, 255], "filter": [1, 255], "interlace": [1, 2, 255]}[field_name]
        new = rng.choice(values)
        fields = dict(width=w, height=h, depth=depth, colour=colour, comp=comp, filter=filt, interlace=interlace)
        fields[field_name] = new
        chunks[0][1] = struct.pack(">IIBBBBB", *fields.values()) + chunks[0][1][13:]
        return png_bytes(chunks), f"IHDR {field_name}={new} (CRC fixed)"
    if op == "drop":
        kinds = sorted({kind for kind, _ in chunks} - {b"IHDR"})
        kind = rng.choice(kinds) if kinds else b"IEND"
        return png_bytes([c for c in chunks if c[0] != kind]), f"all {kind.decode('latin-1')} chunks removed"
    if op == "ztxt_bomb":
        text = b"Comment\0\0" + _cached("ztxt", lambda: compressed_zeros(64 << 20, 15))
        return png_bytes(chunks[:1] + [[b"zTXt", text]] + chunks[1:]), "zTXt chunk inflating to 64 MiB"
    if op == "plte_short":  # a palette image's palette cut to one entry; in any other PNG, a palette it must not have
        rest = [c for c in chunks[1:] if c[0] != b"PLTE"]
        return png_bytes(chunks[:1] + [[b"PLTE", b"\0\0\0"]] + rest), "PLTE of one entry"
    buf = bytearray(seed.data)  # bad_crc, or an op the seed cannot take
    i = rng.randrange(8, len(buf))
    buf[i] ^= 0x55
    return bytes(buf), f"byte {i} flipped, CRC left wrong"


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of the marker, segment length) up to and including the first SOS."""
    found, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        found.append((marker, pos, length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return found


def mutate_jpeg_marker(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    data = bytearray(seed.data)
    segments = _jpeg_segments(seed.data)
    sof = [s for s in segments if s[0] in (0xC0, 0xC1, 0xC2)]
    sos = [s for s in segments if s[0] == 0xDA]
    op = rng.choice(("sof_dims", "sof_dims", "sof_components", "scan_flip", "scan_flip", "scan_truncate",
                     "segment_length", "table_flip"))
    if op == "sof_dims" and sof:
        _, pos, _ = sof[0]
        h, w = rng.choice((0, 1, 65535, 30000)), rng.choice((0, 1, 65535, 30000))
        data[pos + 5:pos + 9] = struct.pack(">HH", h, w)
        return bytes(data), f"SOF declares {h}x{w}"
    if op == "sof_components" and sof:
        _, pos, _ = sof[0]
        n = rng.choice((0, 2, 5, 255))
        data[pos + 9] = n
        return bytes(data), f"SOF components={n}"
    if op in ("scan_flip", "scan_truncate") and sos:
        _, pos, length = sos[0]
        start = pos + 2 + length
        if op == "scan_flip":
            return bytes(data[:start]) + _flip_some(rng, bytes(data[start:])), "entropy-coded data flipped"
        cut = rng.randrange(start, len(data))
        return bytes(data[:cut]), f"scan cut at {cut} of {len(data)}"
    if op == "segment_length" and segments:
        marker, pos, _ = rng.choice(segments)
        new = rng.choice((0, 1, 2, 0xFFFF))
        data[pos + 2:pos + 4] = struct.pack(">H", new)
        return bytes(data), f"segment FF{marker:02X} length={new}"
    tables = [s for s in segments if s[0] in (0xC4, 0xDB)] or segments
    if not tables:
        return byte_ops(rng, seed.data, 2)[0], "unparsed JPEG; bytes fallback"
    _, pos, length = rng.choice(tables)
    return bytes(data[:pos + 4]) + _flip_some(rng, bytes(data[pos + 4:pos + 2 + length])) + \
        bytes(data[pos + 2 + length:]), "table segment flipped"


_TIFF_TAG_VALUES = {256: [0, 1, 30000, 65535, 0xFFFFFFFF], 257: [0, 1, 30000, 65535, 0xFFFFFFFF],
                    258: [0, 1, 3, 7, 12, 24, 64, 65535], 259: [0, 2, 5, 6, 7, 8, 32773, 34712, 9999],
                    262: [0, 1, 2, 3, 4, 5, 6, 8, 32844, 999], 277: [0, 2, 3, 5, 255, 65535],
                    278: [0, 1, 0xFFFFFFFF], 284: [0, 2, 3], 339: [0, 3, 4, 6, 99]}


def mutate_tiff_ifd(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    parsed = tiff_first_ifd(seed.data)
    if parsed is None:
        return byte_ops(rng, seed.data, 2)[0], "unparsed TIFF; bytes fallback"
    order, offset, count = parsed
    data = bytearray(seed.data)
    entries = []
    for k in range(count):
        at = offset + 2 + 12 * k
        tag, kind, n = struct.unpack(order + "HHI", data[at:at + 8])
        entries.append((at, tag, kind, n))
    op = rng.choice(("value", "value", "value", "count", "type", "offset", "loop", "entries"))
    known = [e for e in entries if e[1] in _TIFF_TAG_VALUES and e[2] in _TIFF_TYPES and e[3] == 1]
    if op == "value" and known:
        at, tag, kind, _ = rng.choice(known)
        fmt, size = _TIFF_TYPES[kind]
        value = rng.choice(_TIFF_TAG_VALUES[tag]) & (0xFFFF if size == 2 else 0xFFFFFFFF)
        data[at + 8:at + 8 + size] = struct.pack(order + fmt, value)
        return bytes(data), f"tag {tag}={value}"
    if op == "loop":
        next_at = offset + 2 + 12 * count
        data[next_at:next_at + 4] = struct.pack(order + "I", offset)
        return bytes(data), "next-IFD offset points back at the first IFD"
    if op == "entries":
        data[offset:offset + 2] = struct.pack(order + "H", 0xFFFF)
        return bytes(data), "IFD claims 65535 entries"
    at, tag, kind, n = rng.choice(entries)
    if op == "count":
        new = rng.choice((0, 0x7FFFFFFF, n + 1000))
        data[at + 4:at + 8] = struct.pack(order + "I", new)
        return bytes(data), f"tag {tag} count {n}->{new}"
    if op == "type":
        new = rng.choice((0, 13, 99, 2))
        data[at + 2:at + 4] = struct.pack(order + "H", new)
        return bytes(data), f"tag {tag} type {kind}->{new}"
    new = len(data) + rng.choice((0, 1000, 0x7FFFFFF0 - len(data)))
    data[at + 8:at + 12] = struct.pack(order + "I", new & 0xFFFFFFFF)
    return bytes(data), f"tag {tag} value/offset beyond the end of the file"


_NIFTI_ABSURD: dict[str, list] = {
    "dim": ["dim0", "dim_axis", "dims_huge"], "datatype": [0, 1, 32, 128, 1536, 1792, 2304, 999],
    "bitpix": [0, 1, 7, 999], "vox_offset": [0.0, 1.0, 347.0, 1e9, -352.0, math.nan],
    "scl_slope": [0.0, math.nan, math.inf, -math.inf, 1e38, -1.0], "scl_inter": [math.nan, 1e38, -math.inf],
    "pixdim": [0.0, math.nan, -1.0, math.inf, 1e38], "cal_max": [math.nan], "qform_code": [1, 5, 999, -1],
    "sform_code": [1, 5, 999, -1], "quatern": [math.nan, 1e38, 2.0], "srow": [0.0, math.nan, math.inf],
    "magic": [b"n+2\x00", b"xxxx", b"ni1\x00"], "sizeof_hdr": [0, 347, 540, -1], "intent_code": [1002, 2005, 9999],
}


def _nifti_field(head: bytearray, order: str, name: str, rng: random.Random) -> str:
    offset, fmt = NIFTI_FIELDS[name]
    value = rng.choice(_NIFTI_ABSURD[name])
    current = list(struct.unpack_from(order + fmt, head, offset))
    if name == "dim":
        if value == "dim0":
            current[0] = rng.choice((-1, 0, 8, 32767, -32768))
        elif value == "dim_axis":
            current[rng.randint(1, 4)] = rng.choice((0, -5, 32767))
        else:
            current[0], current[1:4] = 3, [32767] * 3
        struct.pack_into(order + fmt, head, offset, *current)
        return f"dim={current}"
    if len(current) > 1:  # an array field: one element, or all of them
        if rng.random() < 0.5:
            current[rng.randrange(len(current))] = value
        else:
            current = [value] * len(current)
        struct.pack_into(order + fmt, head, offset, *current)
        return f"{name}={current}"
    struct.pack_into(order + fmt, head, offset, value)
    return f"{name}={value!r}"


def mutate_nifti_header(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    packed = seed.kind == "nifti_gz"
    data = gzip.decompress(seed.data) if packed else seed.data
    order = _nifti_endian(data)
    if order is None:  # NIfTI-2: no field table here
        return byte_ops(rng, data[:540], 2)[0] + data[540:], "NIfTI-2 header bytes flipped"
    head = bytearray(data)
    names = [rng.choice(sorted(_NIFTI_ABSURD)) for _ in range(rng.choice((1, 1, 2)))]
    done = [_nifti_field(head, order, name, rng) for name in names]
    if any(n in ("srow", "quatern") for n in names):  # make the affine that was broken the one in use
        struct.pack_into(order + "hh", head, 252, 1, 1 if "srow" in names else 0)
    out = bytes(head)
    return (gzip_bytes(out) if packed else out), "; ".join(done)


def mutate_gz_stream(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    data = seed.data
    if len(data) < 20 or not data.startswith(b"\x1f\x8b"):
        return byte_ops(rng, data, 2)[0], "not gzip; bytes fallback"
    op = rng.choice(("body_flip", "body_flip", "body_truncate", "crc", "isize", "garbage_member", "trailing",
                     "flags"))
    if op == "body_flip":
        return data[:10] + _flip_some(rng, data[10:-8]) + data[-8:], "deflate body flipped"
    if op == "body_truncate":
        cut = rng.randrange(10, len(data) - 8)
        return data[:cut], f"compressed stream cut at {cut} of {len(data)}"
    if op == "crc":
        return data[:-8] + bytes(4) + data[-4:], "gzip CRC zeroed"
    if op == "isize":
        return data[:-4] + struct.pack("<I", 0xFFFFFFFF), "gzip ISIZE = 4 GiB"
    if op == "garbage_member":
        return data + b"\x1f\x8b\x08\x00" + rng.randbytes(64), "second gzip member of garbage"
    if op == "trailing":
        return data + rng.randbytes(rng.randint(1, 512)), "trailing garbage"
    return data[:3] + bytes([rng.choice((0x04, 0x08, 0x10, 0xFF))]) + data[4:], "gzip header flags changed"


# ------------------------------------------------------------------------------------------- bombs

_BOMB_CACHE: dict[str, bytes] = {}


def _cached(key: str, build) -> bytes:
    if key not in _BOMB_CACHE:
        _BOMB_CACHE[key] = build()
    return _BOMB_CACHE[key]


def _dicom_image(rows: int, cols: int, frames: int, tsyntax: str, pixel_bytes: int, filler: int = 0) -> bytes:
    """A minimal secondary-capture DICOM whose pixel data is ``pixel_bytes`` zero bytes, after a private
    element of ``filler`` zero bytes when asked. A deflated data set is compressed piece by piece, so a
    gigabyte of zeros never sits in memory."""
    sop_class = b"1.2.840.10008.5.1.4.1.1.7"
    meta = meta_group([(1, b"OB", b"\0\1"), (2, b"UI", sop_class), (3, b"UI", b"1.2.3.4.5.6.7.8"),
                       (0x10, b"UI", tsyntax.encode())])
    pieces: list[bytes | int] = [dicom_element(0x0008, 0x0016, b"UI", sop_class)
                                 + dicom_element(0x0008, 0x0060, b"CS", b"OT")
                                 + dicom_element(0x0009, 0x0010, b"LO", b"FUZZ")]
    if filler:
        pieces += [struct.pack("<HH", 0x0009, 0x1000) + b"OB\0\0" + struct.pack("<I", filler), filler]
    pieces.append(dicom_element(0x0028, 0x0002, b"US", struct.pack("<H", 1))
                  + dicom_element(0x0028, 0x0004, b"CS", b"MONOCHROME2")
                  + dicom_element(0x0028, 0x0008, b"IS", str(frames).encode())
                  + dicom_element(0x0028, 0x0010, b"US", struct.pack("<H", rows))
                  + dicom_element(0x0028, 0x0011, b"US", struct.pack("<H", cols))
                  + b"".join(dicom_element(0x0028, e, b"US", struct.pack("<H", v))
                             for e, v in ((0x0100, 8), (0x0101, 8), (0x0102, 7), (0x0103, 0)))
                  + struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", pixel_bytes))
    pieces.append(pixel_bytes)
    head = b"\0" * 128 + b"DICM" + meta
    if tsyntax != "1.2.840.10008.1.2.1.99":
        return head + b"".join(bytes(p) if isinstance(p, int) else p for p in pieces)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body, block = [], bytes(1 << 24)
    for p in pieces:
        if isinstance(p, bytes):
            body.append(c.compress(p))
            continue
        for start in range(0, p, len(block)):
            body.append(c.compress(block[:min(len(block), p - start)]))
    body.append(c.flush())
    return head + b"".join(body)


def _bomb_png_zlib() -> bytes:
    side = 16384
    return png_bytes([ihdr(side, side), [b"IDAT", compressed_zeros((side + 1) * side, 15)], [b"IEND", b""]])


def _bomb_tiff_deflate() -> bytes:
    side = 16384
    return tiff_bytes(side, side, compressed_zeros(side * side, 15), compression=8)


def _bomb_nifti_gz() -> bytes:
    dims = (1024, 1024, 256)  # float32: 1 GiB of zeros
    head = nifti_header(dims)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [c.compress(head)]
    block = bytes(1 << 24)
    for _ in range(dims[0] * dims[1] * dims[2] * 4 // len(block)):
        parts.append(c.compress(block))
    parts.append(c.flush())
    return b"".join(parts)


def _bomb_jpeg_declared(seeds: list[Seed]) -> bytes:
    jpeg = next(s for s in seeds if s.name == "generated:grey8.jpg")
    data = bytearray(jpeg.data)
    _, pos, _ = next(s for s in _jpeg_segments(jpeg.data) if s[0] in (0xC0, 0xC1, 0xC2))
    data[pos + 5:pos + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


# name -> (suffix, builder(seeds)); the compressed ones are built once per campaign (a few seconds each)
BOMBS = {
    "png_declared_30000": (".png", lambda s: png_bytes([ihdr(30000, 30000), [b"IDAT", zlib.compress(bytes(30001 * 2))],
                                                       [b"IEND", b""]])),
    "png_declared_10000": (".png", lambda s: png_bytes([ihdr(10000, 10000), [b"IDAT", zlib.compress(bytes(10001))],
                                                       [b"IEND", b""]])),
    "png_declared_rgb16_20000": (".png", lambda s: png_bytes([ihdr(20000, 20000, 16, 2),
                                                             [b"IDAT", zlib.compress(bytes(64))], [b"IEND", b""]])),
    "png_zlib_16384": (".png", lambda s: _cached("png_zlib", _bomb_png_zlib)),
    "tiff_declared_30000": (".tif", lambda s: tiff_bytes(30000, 30000, bytes(64))),
    "tiff_declared_16bit_65535": (".tif", lambda s: tiff_bytes(65535, 65535, bytes(64), bits=16)),
    "tiff_deflate_16384": (".tif", lambda s: _cached("tiff_deflate", _bomb_tiff_deflate)),
    "jpeg_declared_65500": (".jpg", _bomb_jpeg_declared),
    "dicom_declared_30000": (".dcm", lambda s: _dicom_image(30000, 30000, 1, _EXPLICIT_LE, 64)),
    "dicom_declared_frames": (".dcm", lambda s: _dicom_image(512, 512, 100000, _EXPLICIT_LE, 512 * 512)),
    "dicom_deflate_filler_1GiB": (".dcm", lambda s: _cached("dicom_filler", lambda: _dicom_image(
        8, 8, 1, _DEFLATED, 64, filler=1 << 30))),
    "dicom_deflate_pixels_16384": (".dcm", lambda s: _cached("dicom_pixels", lambda: _dicom_image(
        16384, 16384, 1, _DEFLATED, 16384 * 16384))),
    "nifti_declared_32767": (".nii", lambda s: nifti_header((32767, 32767, 32767)) + bytes(64)),
    "nifti_gz_declared_32767": (".nii.gz", lambda s: gzip_bytes(nifti_header((32767, 32767, 32767)) + bytes(64))),
    "nifti_declared_4d": (".nii", lambda s: nifti_header((512, 512, 512, 100)) + bytes(64)),
    "nifti_gz_1GiB": (".nii.gz", lambda s: _cached("nifti_gz", _bomb_nifti_gz)),
}


def unique_bomb(data: bytes, suffix: str, tag: int) -> bytes:
    """The bomb made unique by a harmless change (a text chunk, a UID, a timestamp): identical files
    would be ingested once and the copies marked duplicate, never decoded."""
    text = b"%d" % tag
    if suffix == ".png":
        return data[:33] + png_bytes([[b"tEXt", b"fuzz\0" + text]])[8:] + data[33:]  # after the IHDR chunk
    if suffix == ".jpg":
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]
    if suffix == ".dcm":
        return with_meta_uid(data, 3, f"1.2.3.4.5.6.7.8.{tag}")  # (0002,0003) Media Storage SOP Instance UID
    if suffix == ".nii":
        return data[:148] + text.ljust(80, b"\0") + data[228:]  # the header's description field
    if suffix == ".nii.gz":
        return data[:4] + struct.pack("<I", tag) + data[8:]  # the gzip member's timestamp
    return data + text  # TIFF: bytes after the strip that nothing points at


def make_bomb(rng: random.Random, seeds: list[Seed], tag: int) -> Mutant:
    name = rng.choice(sorted(BOMBS))
    suffix, build = BOMBS[name]
    return Mutant(unique_bomb(build(seeds), suffix, tag), "bomb", name, suffix=suffix)


# -------------------------------------------------------------------------------- non-images, specials


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        # a fixed time stamp: writestr(name) would stamp the current minute, and identical archives
        # made in different minutes would stop being duplicates of each other
        z.writestr(zipfile.ZipInfo("image.dcm", date_time=(2020, 1, 1, 0, 0, 0)), b"\0" * 128 + b"DICM")
    return buf.getvalue()


NONIMAGES = {
    "text": (".txt", lambda r: b"Patient notes: nothing to see here.\n" * r.randint(1, 50)),
    "random": (".dcm", lambda r: r.randbytes(r.randint(1, 20000))),
    "empty": (".dcm", lambda r: b""),
    "json": (".json", lambda r: json.dumps({"a": list(range(r.randint(1, 100)))}).encode()),
    "csv": (".csv", lambda r: b"path,label\nx.dcm,1\n"),
    "zip": (".zip", lambda r: _zip_bytes()),
    "gzip_text": (".gz", lambda r: gzip_bytes(b"hello " * 1000)),
    "dicm_only": (".dcm", lambda r: b"\0" * 128 + b"DICM"),
    "dicm_meta_only": (".dcm", lambda r: b"\0" * 128 + b"DICM" + meta_group([(0x10, b"UI", b"1.2.840.10008.1.2.1")])),
    "nifti_header_only": (".nii", lambda r: nifti_header((64, 64, 10))),
    "png_signature_only": (".png", lambda r: b"\x89PNG\r\n\x1a\n"),
    "jpeg_soi_only": (".jpg", lambda r: b"\xff\xd8\xff"),
    "tiff_header_only": (".tif", lambda r: b"II*\x00" + struct.pack("<I", 0x7FFFFFFF)),
    "gzip_magic_only": (".nii.gz", lambda r: b"\x1f\x8b"),
    "html": (".html", lambda r: b"<html><script>alert(1)</script></html>"),
    "nul_bytes": ("", lambda r: bytes(r.randint(1, 5000))),
}


def make_nonimage(rng: random.Random) -> Mutant:
    name = rng.choice(sorted(NONIMAGES))
    suffix, build = NONIMAGES[name]
    return Mutant(build(rng), "nonimage", name, suffix=suffix)


SPECIALS = ("fifo", "symlink_dev_zero", "symlink_dangling", "symlink_loop", "symlink_to_seed", "unreadable_file",
            "unreadable_folder")


def make_special(kind: str, path: Path, seed_file: Path) -> None:
    """Create a non-regular entry at ``path``. ``seed_file``: an existing file some kinds point at or copy."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink_dev_zero":
        os.symlink("/dev/zero", path)
    elif kind == "symlink_dangling":
        os.symlink(path.parent / "no-such-file", path)
    elif kind == "symlink_loop":
        os.symlink(path, path)
    elif kind == "symlink_to_seed":
        os.symlink(seed_file, path)
    elif kind == "unreadable_file":
        shutil.copyfile(seed_file, path)
        path.chmod(0)
    elif kind == "unreadable_folder":
        path.mkdir()
        shutil.copyfile(seed_file, path / "inside.dcm")
        path.chmod(0)
    else:
        raise ValueError(f"unknown special entry kind {kind}")


# ------------------------------------------------------------------------------------ mutant plan

# mutator -> (weight, seed families it applies to: None = any family, () = needs no seed)
MUTATORS: dict[str, tuple[float, tuple[str, ...] | None]] = {
    "copy": (2, None), "bytes": (26, None), "truncate": (10, None),
    "dicom_field": (20, ("dicom",)), "dicom_tsuid": (4, ("dicom",)), "dicom_stream": (9, ("dicom",)),
    "png_chunk": (4, ("png",)), "jpeg_marker": (3, ("jpeg",)), "tiff_ifd": (4, ("tiff",)),
    "nifti_header": (6, ("nifti", "nifti_gz")), "gz_stream": (3, ("nifti_gz", "gzip")),
    "bomb": (4.5, ()), "nonimage": (2.5, ()), "special": (0.6, ()),
}
SEED_MUTATORS = {
    "copy": mutate_copy, "bytes": mutate_bytes, "truncate": mutate_truncate, "dicom_field": mutate_dicom_field,
    "dicom_tsuid": mutate_dicom_tsuid, "dicom_stream": mutate_dicom_stream, "png_chunk": mutate_png_chunk,
    "jpeg_marker": mutate_jpeg_marker, "tiff_ifd": mutate_tiff_ifd, "nifti_header": mutate_nifti_header,
    "gz_stream": mutate_gz_stream,
}
# For the mutators that take any seed: how often each family is the seed (DICOM seeds outnumber the rest).
FAMILY_WEIGHTS = {"dicom": 0.6, "raster": 0.25, "nifti": 0.12, "other": 0.03}


def _choose_seed(rng: random.Random, seeds: list[Seed], kinds: tuple[str, ...] | None,
                 pixels_only: bool = False) -> Seed:
    """A seed of the given kinds (None: any, by FAMILY_WEIGHTS); ``pixels_only``: DICOM with pixel data."""
    if kinds is None:
        families = [f for f in FAMILY_WEIGHTS if any(s.family == f for s in seeds)]
        family = rng.choices(families, [FAMILY_WEIGHTS[f] for f in families])[0]
        candidates = [s for s in seeds if s.family == family]
    else:
        candidates = [s for s in seeds if s.kind in kinds and (s.pixels or not pixels_only)]
    return rng.choices(candidates, [s.weight for s in candidates])[0]


def make_mutant(campaign_seed: int, i: int, seeds: list[Seed], mutators: list[str]) -> Mutant:
    """Mutant number ``i`` of the campaign: depends only on (campaign seed, i, seeds)."""
    rng = random.Random(f"medssl-fuzz:{campaign_seed}:{i}")
    weights = [MUTATORS[m][0] for m in mutators]
    name = rng.choices(mutators, weights)[0]
    if name == "bomb":
        return make_bomb(rng, seeds, i)
    if name == "nonimage":
        return make_nonimage(rng)
    if name == "special":
        kind = rng.choice(SPECIALS)
        return Mutant(None, "special", kind, special=kind)
    seed = _choose_seed(rng, seeds, MUTATORS[name][1], pixels_only=name == "dicom_stream")
    try:
        data, detail = SEED_MUTATORS[name](rng, seed)
    except Exception as e:  # a seed the structured mutator cannot parse: flip bytes instead
        data, detail = byte_ops(rng, seed.data, 2)[0], f"{name} failed ({type(e).__name__}); bytes fallback"
    if name not in ("bytes", "truncate", "copy") and rng.random() < 0.15:  # stack a byte mutation now and then
        data, more = byte_ops(rng, data, 1)
        detail += f" + {more}"
    return Mutant(data, name, detail, seed=seed.name, suffix=seed.suffix)


# Odd file names (bytes: names on Linux are bytes, not necessarily UTF-8)
ODD_NAMES = [b"with space %05d", b"pipe|%05d", b"new\nline%05d", b"\xff\xfe-%05d", b"tab\t%05d", b"-%05d",
             "unicod\u00e9-\u8133-%05d".encode(), b"`tick`%05d", b"<b>%05d</b>", b"L" * 200 + b"%05d",
             b"trailing %05d ", b".hidden%05d", b"cr\r%05d", b"\x1b[31mred%05d", b"star*?%05d", b"%%s%%n%05d",
             b"back\\slash%05d", b"latin1-\xe9-%05d"]


def entry_name(rng: random.Random, i: int, mutant: Mutant) -> bytes:
    """The entry's path relative to the batch folder: mostly plain, sometimes odd, sometimes nested."""
    suffix = mutant.suffix
    if rng.random() < 0.1:  # formats are detected from bytes: names may lie or say nothing
        suffix = rng.choice(("", ".png", ".dcm", ".txt", ".nii.gz", ".DCM", ".jpg"))
    name = (rng.choice(ODD_NAMES) % i if rng.random() < 0.05 else b"%05d" % i) + suffix.encode()
    if rng.random() < 0.05:
        name = b"sub%d/" % (i % 3) + name
    return name


# ========================================================================================== running


@dataclass
class Entry:
    index: int
    rel: bytes                 # path relative to the batch folder
    mutant: Mutant
    rows: list = field(default_factory=list)   # manifest rows found for it (completed runs only)
    culprit: str | None = None  # "crash" | "hang" when isolation pinned a failure on it

    @property
    def display(self) -> str:
        return self.rel.decode("utf-8", "backslashreplace")

    def record(self) -> dict:
        m = self.mutant
        return {"index": self.index, "name": self.display, "mutator": m.mutator, "detail": m.detail,
                "seed": m.seed, "special": m.special}


def write_entry(folder: Path, entry: Entry, seed_file: Path) -> None:
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), entry.rel)))
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.mutant.special:
        make_special(entry.mutant.special, path, seed_file)
    else:
        path.write_bytes(entry.mutant.data)


def link_entry(src_folder: Path, dst_folder: Path, entry: Entry, seed_file: Path) -> None:
    """Put an already written entry into another folder (a hard link; specials are made again)."""
    if entry.mutant.special:
        write_entry(dst_folder, entry, seed_file)
        return
    src = os.path.join(os.fsencode(src_folder), entry.rel)
    dst = os.path.join(os.fsencode(dst_folder), entry.rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.link(src, dst)


def remove_tree(path: Path) -> None:
    """rmtree that first gives back the permissions the unreadable specials took away."""
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class RunResult:
    folder: str
    n: int
    rc: int | None            # None when killed for the time limit
    seconds: float
    peak_rss_mb: float        # the largest process of the CLI's process tree (reaped ones)
    verdict: str              # ok | crash | hang
    why: str = ""
    stderr_tail: str = ""
    isolation: dict | None = None  # report.json's isolation section, if any


def medssl_command() -> list[str]:
    script = Path(sys.executable).parent / "medssl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "medssl.cli"]


def _limit_memory(mb: int):
    def apply() -> None:
        limit = mb << 20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return apply if mb > 0 else None


def run_cli(folder: Path, out: Path, opts, timeout: float) -> RunResult:
    """``medssl ingest folder --out out`` under a wall-clock limit; the process tree's peak RSS via wait4."""
    cmd = medssl_command() + ["ingest", str(folder), "--out", str(out), "--workers", str(opts.workers), "--quiet"]
    for s in opts.set:
        cmd += ["--set", s]
    env = {**os.environ, "MEDSSL_SALT_FILE": str(opts.out / "salt")}
    log_out, log_err = out.parent / (out.name + ".stdout"), out.parent / (out.name + ".stderr")
    start = time.perf_counter()
    with open(log_out, "wb") as fo, open(log_err, "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_limit_memory(opts.memory_safety_mb))
    status, usage, timed_out = None, None, False
    while status is None:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, usage = st, ru
        elif time.perf_counter() - start > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
        else:
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    if not timed_out:
        try:  # the session's other processes (pool workers left behind by a dying CLI) go too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = log_err.read_bytes().decode("utf-8", "replace")
    rc = None if timed_out else proc.returncode
    result = RunResult(str(folder), 0, rc, round(seconds, 2), round(usage.ru_maxrss / 1024, 1), "ok",
                       stderr_tail=stderr[-3000:])
    if timed_out:
        result.verdict, result.why = "hang", f"no exit within {timeout:.0f} s"
    elif rc < 0:
        result.verdict, result.why = "crash", f"killed by signal {-rc} ({signal.Signals(-rc).name})"
    elif rc not in (0, 1):
        result.verdict, result.why = "crash", f"exit status {rc}: " + _last_line(stderr)
    elif rc == 1 and "Traceback (most recent call last)" in stderr:
        result.verdict, result.why = "crash", "traceback: " + _last_line(stderr)
    elif not (out / "report.json").exists():  # written last, after every manifest part
        result.verdict, result.why = "crash", f"exit status {rc} without a manifest: " + _last_line(stderr)
    elif "Traceback (most recent call last)" in stderr:  # finished, but printed a traceback at the user
        result.why = "printed a traceback: " + _last_line(stderr)
    report = out / "report.json"
    if report.exists():
        try:
            result.isolation = json.loads(report.read_text()).get("isolation")
        except (ValueError, OSError):
            pass
    return result


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# ===================================================================================== accounting


def _strict_json(text: str):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


_UNESCAPE = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def name_bytes(shown: str) -> bytes:
    """The bytes of a file name as ingest shows it (README: ``\\xNN`` for a byte that is not UTF-8,
    ``\\n``, ``\\r``, ``\\t``, ``\\uNNNN``, ``\\UNNNNNNNN`` for other unprintable characters, ``\\\\``
    for a backslash). Matching rows through it checks that every name can be recovered from its row."""
    out, i = bytearray(), 0
    while i < len(shown):
        ch = shown[i]
        nxt = shown[i + 1] if i + 1 < len(shown) else ""
        width = {"x": 2, "u": 4, "U": 8}.get(nxt)
        if ch == "\\" and nxt in _UNESCAPE:
            out += _UNESCAPE[nxt].encode()
            i += 2
        elif ch == "\\" and width:
            code = int(shown[i + 2:i + 2 + width], 16)
            out += bytes([code]) if nxt == "x" else chr(code).encode("utf-8", "surrogatepass")
            i += 2 + width
        else:
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
    return bytes(out)


def _row_keys(root: str, entry: Entry) -> set[bytes]:
    """The names (bytes) a row for the entry may carry: its own, or for an unreadable folder the file inside."""
    keys = {entry.rel}
    if entry.mutant.special == "unreadable_folder":
        keys.add(entry.rel + b"/inside.dcm")
    return {root.encode() + b"/" + k for k in keys}


def _row_name(path: str) -> bytes | None:
    try:
        return name_bytes(path)
    except (ValueError, IndexError):  # not written the documented way: it matches no input
        return None


@dataclass
class Findings:
    """Everything the campaign found beyond the counts."""

    leaks: list = field(default_factory=list)          # a reason quoting a canary header value
    invalid_json: list = field(default_factory=list)   # NaN / Infinity in manifest, report or sample JSON
    unexpected_rows: list = field(default_factory=list)


def account(folder: Path, out: Path, entries: list[Entry], findings: Findings) -> None:
    """Attach each manifest row to its entry; check the outputs are strict JSON and leak no canary."""
    root = folder.name
    by_key: dict[bytes, Entry] = {}
    for e in entries:
        for k in _row_keys(root, e):
            by_key.setdefault(k, e)
    lines = [line for part in sorted((out / "manifest").glob("chunk-*.jsonl"))
             for line in part.read_text(errors="replace").splitlines()]
    for line in lines:
        try:
            row = _strict_json(line)
        except ValueError as err:
            findings.invalid_json.append({"file": "manifest/", "error": str(err), "line": line[:300]})
            row = json.loads(line)
        entry = by_key.get(_row_name(row.get("path") or ""))
        if entry is None:
            findings.unexpected_rows.append({"run": root, "path": row.get("path"), "status": row.get("status")})
            continue
        entry.rows.append(row)
        reason = row.get("reason") or ""
        if any(c in reason for c in CANARIES):
            findings.leaks.append({**entry.record(), "reason": reason})
    report = out / "report.json"
    if report.exists():
        try:
            _strict_json(report.read_text())
        except ValueError as err:
            findings.invalid_json.append({"file": "report.json", "run": root, "error": str(err)})
    _check_shard_json(out, entries, findings)


def _check_shard_json(out: Path, entries: list[Entry], findings: Findings) -> None:
    owner = {key: e for e in entries for row in e.rows for key in row.get("samples") or []}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                text = tar.extractfile(member).read().decode("utf-8", "replace")
                try:
                    _strict_json(text)
                except ValueError as err:
                    key = member.name[:-len(".json")]
                    e = owner.get(key)
                    findings.invalid_json.append({"file": f"{shard.name}:{member.name}", "error": str(err),
                                                  **(e.record() if e else {})})


# ====================================================================================== campaign


# Rejections whose inputs are kept for the people fixing decoders: a bug, a decoder that ran out of time, one
# that died.
SAVED_REASONS = ("internal_error", "timeout", "decoder_crash")


class Campaign:
    def __init__(self, opts, seeds: list[Seed]):
        self.opts = opts
        self.seeds = seeds
        # the file that links point at and unreadable entries copy
        self.seed_file = next((s.path for s in seeds if s.name == "pydicom:MR_small.dcm"), seeds[0].path)
        self.work = opts.out / "work"
        self.runs: list[RunResult] = []          # top-level batch runs
        self.split_runs: list[RunResult] = []    # runs made to isolate a failure
        self.entries: list[Entry] = []
        self.completed: set[int] = set()         # entry indices whose rows come from a completed run
        self.findings = Findings()
        self.unisolated: list[dict] = []         # failed groups left when the split budget ran out

    def mutators(self) -> list[str]:
        chosen = self.opts.only or list(MUTATORS)
        return [m for m in chosen if m not in self.opts.exclude]

    def batch_entries(self, start: int, stop: int) -> list[Entry]:
        mutators = self.mutators()
        out = []
        for i in range(start, stop):
            mutant = make_mutant(self.opts.seed, i, self.seeds, mutators)
            rng = random.Random(f"medssl-fuzz-name:{self.opts.seed}:{i}")
            out.append(Entry(i, entry_name(rng, i, mutant), mutant))
        return out

    def run(self) -> None:
        self.work.mkdir(parents=True)
        first, size = self.opts.start, self.opts.batch
        stop = first + self.opts.inputs
        for b, start in enumerate(range(first, stop, size)):
            entries = self.batch_entries(start, min(stop, start + size))
            self.entries += entries
            folder = self.work / f"b{b:04d}"
            folder.mkdir()
            for e in entries:
                write_entry(folder, e, self.seed_file)
            result = self.run_group(folder, entries, self.opts.timeout, top=True)
            self.progress(b, result)
            if result.rc == 2 and b == 0:
                raise SystemExit(f"medssl ingest refused the settings: {_last_line(result.stderr_tail)}")
            if result.verdict != "ok" and self.opts.isolate:
                self.isolate(folder, entries, result)
            remove_tree(folder)
            for e in entries:  # 10,000 inputs' bytes are not kept: the offending ones were saved
                e.mutant.data = None
        remove_tree(self.work)

    def run_group(self, folder: Path, entries: list[Entry], timeout: float, top: bool) -> RunResult:
        out = folder.parent / (folder.name + ".out")
        result = run_cli(folder, out, self.opts, timeout)
        result.n = len(entries)
        (self.runs if top else self.split_runs).append(result)
        if result.verdict == "ok":
            account(folder, out, entries, self.findings)
            self.completed |= {e.index for e in entries}
            for e in entries:
                if e.rows and reason_code(e.rows[0]) in SAVED_REASONS:
                    self.save_input(folder, e, reason_code(e.rows[0]), None, reason=e.rows[0].get("reason"))
        elif top:
            self.save_run_failure(result)
        if self.opts.keep_work:
            return result
        remove_tree(out)
        for suffix in (".stdout", ".stderr"):
            (out.parent / (out.name + suffix)).unlink(missing_ok=True)
        return result

    def isolate(self, folder: Path, entries: list[Entry], failed: RunResult) -> None:
        """Split a failed group in halves, rerun each, recurse into the failing ones, down to single inputs."""
        if len(entries) == 1:
            entries[0].culprit = failed.verdict
            self.save_input(folder, entries[0], failed.verdict, failed)
            return
        halves = (entries[:len(entries) // 2], entries[len(entries) // 2:])
        for k, half in enumerate(halves):
            if len(self.split_runs) >= self.opts.max_split_runs:
                self.unisolated.append({"verdict": failed.verdict, "inputs": [e.record() for e in half]})
                continue
            sub = folder.parent / f"{folder.name}.{k}"
            sub.mkdir()
            for e in half:
                link_entry(folder, sub, e, self.seed_file)
            result = self.run_group(sub, half, min(self.opts.timeout, self.opts.split_timeout), top=False)
            if result.verdict != "ok":
                self.isolate(sub, half, result)
            remove_tree(sub)

    def save_input(self, folder: Path, entry: Entry, category: str, result: RunResult | None,
                   reason: str | None = None) -> None:
        """Keep an offending input under OUT/findings/<category>/NNNNN/ with its own name (names can be the
        cause), so that ``medssl ingest OUT/findings/<category>/NNNNN`` reproduces it; NNNNN.json says
        what it is. Special entries (FIFOs, links) are described, not copied."""
        dest = self.opts.out / "findings" / category
        dest.mkdir(parents=True, exist_ok=True)
        record = entry.record()
        if reason is not None:
            record["reason"] = reason
        if result is not None:
            record.update(run_verdict=result.verdict, why=result.why, stderr_tail=result.stderr_tail[-1500:])
        saved = sum(1 for _ in dest.glob("*.json"))
        src = os.path.join(os.fsencode(folder), entry.rel)
        if saved < self.opts.max_saved and not entry.mutant.special and os.path.isfile(src):
            target = os.path.join(os.fsencode(dest / f"{entry.index:05d}"), entry.rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(src, target)
            record["saved_in"] = str(dest / f"{entry.index:05d}")
        (dest / f"{entry.index:05d}.json").write_text(json.dumps(record, indent=1))

    def save_run_failure(self, result: RunResult) -> None:
        dest = self.opts.out / "findings" / "runs"
        dest.mkdir(parents=True, exist_ok=True)
        name = Path(result.folder).name
        (dest / f"{name}.json").write_text(json.dumps(result.__dict__, indent=1))

    def progress(self, b: int, result: RunResult) -> None:
        done = sum(r.n for r in self.runs)
        worker = (result.isolation or {}).get("worker_peak_rss_mb")
        print(f"  batch {b}: {result.n} inputs, {result.verdict}{' (' + result.why + ')' if result.why else ''}, "
              f"{result.seconds:.1f} s, peak {result.peak_rss_mb:.0f} MB"
              f"{f', decode worker {worker:.0f} MB' if worker is not None else ''}  [{done}/{self.opts.inputs}]",
              flush=True)


# ======================================================================================== summary


def reason_code(row: dict) -> str:
    return (row.get("reason") or "").split(":")[0].strip() or "-"


def summarize(c: Campaign, wall: float) -> dict:
    per_mutator: dict[str, Counter] = defaultdict(Counter)
    statuses, reasons = Counter(), Counter()
    reason_examples: dict[str, list] = defaultdict(list)
    internal, missing, duplicated = [], [], []
    for e in c.entries:
        m = per_mutator[e.mutant.mutator]
        m["inputs"] += 1
        if e.culprit:
            m[e.culprit + "_culprit"] += 1
        if e.index not in c.completed:
            m["in_failed_run"] += 1
            continue
        if not e.rows:
            m["no_row"] += 1
            missing.append(e.record())
            continue
        if len(e.rows) > 1:
            duplicated.append({**e.record(), "rows": len(e.rows)})
        row = e.rows[0]
        statuses[row.get("status")] += 1
        m[row.get("status")] += 1
        code = reason_code(row)
        if row.get("status") == "rejected":
            reasons[code] += 1
            m["reason:" + code] += 1
            if len(reason_examples[code]) < 5:
                reason_examples[code].append({**e.record(), "reason": row.get("reason")})
        if code == "internal_error":
            m["internal_error"] += 1
            internal.append({**e.record(), "reason": row.get("reason")})
    iso = [r.isolation for r in c.runs + c.split_runs if r.isolation]
    worker_peak = max((i.get("worker_peak_rss_mb") or 0 for i in iso), default=None)
    budget = max((i.get("max_memory_mb") or 0 for i in iso), default=None)
    tree_peak = max((r.peak_rss_mb for r in c.runs + c.split_runs), default=0.0)
    noisy = [r for r in c.runs + c.split_runs if r.verdict == "ok" and r.why]
    crashes = [r for r in c.runs if r.verdict == "crash"]
    hangs = [r for r in c.runs if r.verdict == "hang"]
    near_net = c.opts.memory_safety_mb and tree_peak >= 0.9 * c.opts.memory_safety_mb
    totals = {
        "inputs": len(c.entries), "cli_runs": len(c.runs), "isolation_runs": len(c.split_runs),
        "crashed_runs": len(crashes), "hung_runs": len(hangs),
        "inputs_in_failed_runs": sum(r.n for r in crashes + hangs),
        "crash_culprits": sum(e.culprit == "crash" for e in c.entries),
        "hang_culprits": sum(e.culprit == "hang" for e in c.entries),
        "inputs_without_row": len(missing), "inputs_with_several_rows": len(duplicated),
        "rows_matching_no_input": len(c.findings.unexpected_rows),
        "internal_error": len(internal), "header_value_leaks": len(c.findings.leaks),
        "invalid_json": len(c.findings.invalid_json), "finished_runs_with_traceback": len(noisy),
        "wall_s": round(wall, 1), "cli_seconds": round(sum(r.seconds for r in c.runs), 1),
        "isolation_seconds": round(sum(r.seconds for r in c.split_runs), 1),
        "slowest_run_s": max((r.seconds for r in c.runs), default=0.0),
        "cli_tree_peak_rss_mb": tree_peak, "worker_peak_rss_mb": worker_peak, "memory_budget_mb": budget or None,
        "worker_faults": sum(i.get("worker_faults") or 0 for i in iso) if iso else None,
        "memory_safety_net_mb": c.opts.memory_safety_mb or None, "safety_net_reached": bool(near_net),
    }
    over_budget = bool(budget) and worker_peak is not None and worker_peak > budget
    totals["over_budget"] = over_budget
    clean = not (crashes or hangs or missing or duplicated or internal or c.findings.leaks or c.findings.invalid_json
                 or c.findings.unexpected_rows or over_budget or near_net)
    return {
        "clean": clean, "totals": totals, "status": dict(statuses), "reasons": dict(reasons.most_common()),
        "by_mutator": {m: dict(v) for m, v in sorted(per_mutator.items())},
        "isolation_reports": iso[:1],
        "examples": {
            "internal_error": internal[:50], "crashed_runs": [r.__dict__ for r in crashes[:10]],
            "hung_runs": [r.__dict__ for r in hangs[:10]], "runs_with_traceback": [r.__dict__ for r in noisy[:10]],
            "crash_culprits": [e.record() for e in c.entries if e.culprit == "crash"][:50],
            "hang_culprits": [e.record() for e in c.entries if e.culprit == "hang"][:50],
            "unisolated": c.unisolated[:10], "without_row": missing[:50], "several_rows": duplicated[:50],
            "rows_matching_no_input": c.findings.unexpected_rows[:50], "leaks": c.findings.leaks[:50],
            "invalid_json": c.findings.invalid_json[:50], "by_reason": dict(reason_examples),
        },
    }


def _mb(v) -> str:
    return "not reported" if v is None else f"{v:,.0f} MB"


def markdown(summary: dict) -> str:
    t = summary["totals"]
    lines = ["| measure | value |", "| --- | ---: |"]
    rows = [
        ("inputs (files and special entries)", f"{t['inputs']:,}"),
        ("CLI runs (+ runs to isolate failures)", f"{t['cli_runs']} (+{t['isolation_runs']})"),
        ("crashed runs / inputs found responsible", f"{t['crashed_runs']} / {t['crash_culprits']}"),
        ("hung runs / inputs found responsible", f"{t['hung_runs']} / {t['hang_culprits']}"),
        ("inputs in crashed or hung runs", f"{t['inputs_in_failed_runs']:,}"),
        ("inputs without a manifest row (completed runs)", t["inputs_without_row"]),
        ("inputs with several rows / rows matching no input", f"{t['inputs_with_several_rows']} / "
                                                               f"{t['rows_matching_no_input']}"),
        ("`internal_error` rows", t["internal_error"]),
        ("reasons quoting a header value (canaries)", t["header_value_leaks"]),
        ("outputs that are not strict JSON (NaN, Infinity)", t["invalid_json"]),
        ("finished runs that printed a traceback", t["finished_runs_with_traceback"]),
        ("time: CLI runs / runs isolating failures / whole campaign",
         f"{t['cli_seconds']:,.0f} s / {t['isolation_seconds']:,.0f} s / {t['wall_s']:,.0f} s"),
        ("slowest CLI run", f"{t['slowest_run_s']:,.1f} s"),
        ("peak RSS, largest process of a CLI run", _mb(t["cli_tree_peak_rss_mb"])),
        ("peak RSS per worker (ingest report) / budget",
         f"{_mb(t['worker_peak_rss_mb'])} / {_mb(t['memory_budget_mb'])}"),
        ("decode worker faults, each one replaced (ingest report)",
         "not reported" if t["worker_faults"] is None else t["worker_faults"]),
    ]
    lines += [f"| {a} | {b} |" for a, b in rows]
    out = "\n".join(lines)
    out += "\n\nRows by status: " + ", ".join(f"{k} {v:,}" for k, v in sorted(summary["status"].items(), key=str))
    out += "\n\nRejections by reason code:\n\n| reason | files |\n| --- | ---: |\n"
    out += "\n".join(f"| {k} | {v:,} |" for k, v in summary["reasons"].items())
    out += "\n\nBy mutator:\n\n| mutator | inputs | ingested | rejected | duplicate | internal_error | no row " \
           "| in failed runs | crash / hang culprits |\n| --- |" + " ---: |" * 8 + "\n"
    for m, v in summary["by_mutator"].items():
        out += (f"| {m} | {v.get('inputs', 0)} | {v.get('ingested', 0)} | {v.get('rejected', 0)} "
                f"| {v.get('duplicate', 0)} | {v.get('internal_error', 0)} | {v.get('no_row', 0)} "
                f"| {v.get('in_failed_run', 0)} | {v.get('crash_culprit', 0)} / {v.get('hang_culprit', 0)} |\n")
    return out


def print_examples(summary: dict, limit: int = 12) -> None:
    ex = summary["examples"]
    described = ("name", "mutator", "seed", "detail", "special", "reason")  # a name can be the cause
    sections = [("internal_error rows", ex["internal_error"], described),
                ("inputs that crash a run", ex["crash_culprits"], described),
                ("inputs that hang a run", ex["hang_culprits"], described),
                ("inputs without a row", ex["without_row"], described),
                ("header-value leaks", ex["leaks"], described),
                ("not strict JSON", ex["invalid_json"], ("file", "error", "mutator", "detail"))]
    sections += [(f"`{code}` rejections", ex["by_reason"].get(code, []), described) for code in SAVED_REASONS[1:]]
    for title, items, fields in sections:
        if items:
            print(f"\n{title} ({len(items)} listed, first {min(limit, len(items))}):")
            for item in items[:limit]:
                print("  - " + "; ".join(f"{f}={str(item.get(f))[:160]}" for f in fields if item.get(f)))
    for run in ex["crashed_runs"][:3] + ex["hung_runs"][:3] + ex["runs_with_traceback"][:3]:
        print(f"\nrun {Path(run['folder']).name}: {run['verdict']}, {run['why']}")


# ==================================================================================== machine facts


def machine_info() -> dict:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {
        **machine_facts(("pydicom", "pydicom-data", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                         "pylibjpeg-rle", "pillow", "tifffile", "nibabel", "numpy")),
        "commit": (commit.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty.stdout.strip() else ""),
    }


def print_machine(info: dict) -> None:
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable of {info['logical_cores']} logical cores, "
          f"{info['ram_gib']} GiB RAM, {info['os']}")
    print(f"code: medssl at {info['commit']}; python {info['python']}; "
          + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"load average at start (1/5/15 min): {info['load_average_at_start']}")


# ============================================================================================= main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="mutators: " + ", ".join(MUTATORS))
    p.add_argument("--inputs", type=int, default=10_000, metavar="N", help="number of inputs (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed: the same seed makes the same inputs")
    p.add_argument("--start", type=int, default=0, metavar="I",
                   help="first input number: --start 500 --inputs 100 remakes inputs 500-599 of a campaign")
    p.add_argument("--batch", type=int, default=250, metavar="N", help="inputs per CLI run (default 250)")
    p.add_argument("--workers", type=int, default=2, help="--workers of each medssl ingest run (default 2)")
    p.add_argument("--timeout", type=float, default=600, metavar="S",
                   help="wall-clock limit of one CLI run; a run past it is a hang (default 600)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to medssl ingest, e.g. --set file_timeout_s=20 (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="new folder: summary.json, findings/, seeds/")
    p.add_argument("--only", nargs="+", choices=list(MUTATORS), metavar="MUTATOR", help="use only these mutators")
    p.add_argument("--exclude", nargs="+", choices=list(MUTATORS), default=[], metavar="MUTATOR",
                   help="leave these mutators out")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="do not split crashed or hung batches to find the inputs responsible")
    p.add_argument("--split-timeout", type=float, default=60, metavar="S",
                   help="time limit of the runs that isolate a failure; keep it above the ingest's file_timeout_s "
                        "(default 60)")
    p.add_argument("--max-split-runs", type=int, default=80, metavar="N",
                   help="at most N runs spent isolating failures (default 80)")
    p.add_argument("--memory-safety-mb", type=int, default=8192, metavar="MB",
                   help="RLIMIT_DATA of every CLI process: a safety net so that a bomb the ingest lets through "
                        "cannot take a shared machine down; a peak near it is reported (0: off; default 8192)")
    p.add_argument("--max-saved", type=int, default=200, metavar="N", help="inputs saved per finding category")
    p.add_argument("--keep-work", action="store_true", help="keep the ingest outputs of every run under OUT/work")
    args = p.parse_args(argv)
    if args.inputs < 1 or args.batch < 1 or args.workers < 1 or args.start < 0:
        p.error("--inputs, --batch and --workers must be at least 1, --start at least 0")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} exists and is not empty: choose a new folder")
    if not [m for m in (args.only or list(MUTATORS)) if m not in args.exclude]:
        p.error("no mutator left after --only / --exclude")
    args.out = args.out.resolve()
    return args


def campaign(opts: argparse.Namespace, command: str) -> dict:
    """Run the whole campaign; returns (and saves as OUT/summary.json) the summary."""
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "salt").write_text("fuzz-salt-0123456789abcdef0123456789")  # never the user's ~/.medssl/salt
    info = machine_info()
    print(f"command: {command}")
    print_machine(info)
    _quiet_pydicom()
    start = time.perf_counter()
    seeds = load_seeds(opts.out / "seeds")
    kinds = Counter(s.kind for s in seeds)
    print(f"seeds: {len(seeds)} files ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
          f"{opts.inputs} inputs in batches of {opts.batch}, {opts.workers} workers, limit {opts.timeout:.0f} s per run"
          + (f", --set {' '.join(opts.set)}" if opts.set else ""), flush=True)
    c = Campaign(opts, seeds)
    c.run()
    summary = summarize(c, time.perf_counter() - start)
    summary.update(command=command, machine=info, seeds={s.name: s.kind for s in seeds},
                   settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()})
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n## Ingest fuzz campaign\n")
    print(f"command: `{command}`\n")
    print(markdown(summary))
    print_examples(summary)
    print(f"\n{'nothing found' if summary['clean'] else 'FOUND PROBLEMS'}; summary: {opts.out / 'summary.json'}; "
          f"offending inputs: {opts.out / 'findings'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "benchmarks/fuzz_ingest.py", *args])
    summary = campaign(opts, command)
    return 0 if summary["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
