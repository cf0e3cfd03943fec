"""The shard format: the one hand-off between ``medssl ingest`` and training.

Shards are POSIX tar files in the WebDataset layout: consecutive members ``<key>.<pixels>`` and
``<key>.json`` form one sample, so a shard streams from disk or object storage with no index.

- ``<key>.u16.zst`` (``pixel_format`` u16-planes-zstd, the default) or ``<key>.png`` (png16): one grey
  image, lossless. The value of a stored pixel is ``stored * scale + offset`` with ``scale``/``offset``
  from the JSON's ``intensity.store``: CT keeps Hounsfield units at 1 HU resolution over
  [-1024, 64511]; everything else holds [0, 1] at 1/65535 resolution.
  - u16-planes-zstd: the uint16 pixels split into two byte planes (all low bytes, then all high
    bytes: neighbouring high bytes repeat, which zstd packs well), zstd level 9. Decodes ~9x faster
    than 16-bit PNG at the same bytes (BENCHMARKS.md, "Shard format"). Any WebDataset reader decodes it
    in three lines: ``raw = zstandard.ZstdDecompressor().decompress(data)``; ``h, w = meta["size"]``;
    ``planes = np.frombuffer(raw, np.uint8).reshape(2, h, w)``; ``stored = planes[0] | (planes[1].astype(
    np.uint16) << 8)``.
  - png16: a 16-bit PNG, which every image tool opens (shards written before u16-planes-zstd existed,
    whose JSON names no format, are png16).
- ``<key>.json``: metadata (modality, intensity semantics and steps, the pixel format, source content
  hash, frame/slice index and plane, original and stored size and spacing, salted linkage hashes).
  Never patient identifiers.

Keys are ``<first 20 hex of the source file's SHA-256>-<plane letter><frame index>``: stable across
runs and machines, so a resumed ingest reproduces the same keys.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard
from PIL import Image

from medssl.atomic import atomic_open
from medssl.storage import is_url, open_read

HU_OFFSET = -1024.0
NORMALIZED_SCALE = 1.0 / 65535.0
PNG_COMPRESS_LEVEL = 1  # level 1 is ~3x faster than Pillow's default 6 for ~10% larger 16-bit files


# A sample's pixel format -> the extension of its tar member. Readers take every one of them.
PIXEL_EXTENSIONS = {"u16-planes-zstd": "u16.zst", "png16": "png"}
PIXEL_FORMAT = "u16-planes-zstd"
ZSTD_LEVEL = 9  # level 3 decodes as fast for ~2% more bytes; 19 saves ~6% for 16x the encode time


def storage_for(semantics: str, pixel_format: str = PIXEL_FORMAT) -> dict:
    """The JSON's ``intensity.store``: value = stored * scale + offset, and the pixel format."""
    scale, offset = (1.0, HU_OFFSET) if semantics == "hounsfield" else (NORMALIZED_SCALE, 0.0)
    return {"scale": scale, "offset": offset, "format": pixel_format}


def encode_pixels(values: np.ndarray, store: dict) -> bytes:
    """Float values (HU, or [0, 1]) -> the stored bytes described by ``store`` (``storage_for``)."""
    stored = np.clip(np.rint((values - store["offset"]) / store["scale"]), 0, 65535).astype(np.uint16)
    if store["format"] == "png16":
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buf.getvalue()
    planes = np.stack([stored & 0xFF, stored >> 8]).astype(np.uint8)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(planes.tobytes())


def decode_pixels(data: bytes, meta: dict) -> np.ndarray:
    """Stored bytes -> float32 values in the sample's convention (HU, or [0, 1])."""
    store = meta["intensity"]["store"]
    if _pixel_format(meta) == "u16-planes-zstd":
        # Straight from the byte planes into one float array, in place: high * 256 + low is exact in
        # float32, so this equals stored.astype(float32) * scale + offset, and it allocates one array
        # instead of four (fresh large arrays cost page faults: 4x the time of the arithmetic).
        low, high = _planes(data, meta)
        values = high.astype(np.float32)
        values *= np.float32(256)
        values += low
    else:
        values = decode_stored(data, meta).astype(np.float32)
    values *= np.float32(store["scale"])
    values += np.float32(store["offset"])
    return values


def decode_stored(data: bytes, meta: dict) -> np.ndarray:
    """Stored bytes -> the uint16 stored values (value = stored * scale + offset, ``intensity.store``):
    half the bytes of float values, for a loader that leaves the conversion to the training device."""
    pixel_format = _pixel_format(meta)
    if pixel_format == "png16":
        return np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint16)
    low, high = _planes(data, meta)
    stored = high.astype(np.uint16)
    stored <<= 8
    stored |= low
    return stored


def _planes(data: bytes, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) byte planes of a u16-planes-zstd sample."""
    pixel_format = _pixel_format(meta)
    if pixel_format != "u16-planes-zstd":
        raise ValueError(f"sample {meta.get('key')}: unknown pixel format {pixel_format!r} (known: "
                         f"{', '.join(PIXEL_EXTENSIONS)}); written by a newer medssl?")
    h, w = meta["size"]
    planes = np.frombuffer(zstandard.ZstdDecompressor().decompress(data), np.uint8).reshape(2, h, w)
    return planes[0], planes[1]


@dataclass
class Sample:
    key: str
    pixels: bytes  # encoded as the metadata's intensity.store.format says
    meta: dict

    @property
    def extension(self) -> str:
        return PIXEL_EXTENSIONS.get(_pixel_format(self.meta), "bin")


def _pixel_format(meta: dict) -> str:
    """Shards from before the format was recorded hold PNG."""
    return meta.get("intensity", {}).get("store", {}).get("format", "png16")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: same input, same shard
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | Path, samples: list[Sample]) -> int:
    """Write one shard atomically (a local path or an object-storage URL); returns its size in bytes."""
    with atomic_open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                _add_member(tar, f"{s.key}.{s.extension}", s.pixels)
                # Strict JSON: a NaN or infinity in the metadata is a reader bug and must fail here, loudly.
                _add_member(tar, f"{s.key}.json", json.dumps(s.meta, sort_keys=True, allow_nan=False).encode())
        return f.tell()


def read_shard(source) -> Iterator[Sample]:
    """Stream the samples of one shard, in order: ``source`` is a local path, an object-storage URL (read
    a block at a time, never downloaded whole) or a readable binary stream."""
    if isinstance(source, str) and is_url(source):
        with open_read(source) as stream:
            yield from _read_tar(tarfile.open(mode="r|", fileobj=stream))
    elif isinstance(source, (str, Path)):
        yield from _read_tar(tarfile.open(mode="r|", name=str(source)))
    else:
        yield from _read_tar(tarfile.open(mode="r|", fileobj=source))


def _read_tar(tar: tarfile.TarFile) -> Iterator[Sample]:
    with tar:
        pending: dict[str, dict[str, bytes]] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            data = tar.extractfile(member).read()
            parts = pending.setdefault(key, {})
            parts[ext] = data
            pixels = next((parts[e] for e in _PIXEL_MEMBERS if e in parts), None)
            if pixels is not None and "json" in parts:
                del pending[key]
                yield Sample(key=key, pixels=pixels, meta=json.loads(parts["json"]))


_PIXEL_MEMBERS = tuple(PIXEL_EXTENSIONS.values())
