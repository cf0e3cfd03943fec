"""Small 8-bit PNGs of indexed samples, rendered from pixels only (never from headers: no identifiers).

A shard sample is found with one seek: ``medssl embed`` recorded the byte offset of its first tar member,
and the shard reader streams the sample from there. An image-file row is decoded again from its file,
in a decode worker. CT is shown through the window the encoder saw it through.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from medssl import storage
from medssl.shard_format import decode_pixels, read_shard

THUMBNAIL_SIZE = 128


def png(image: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """A [0, 1] image -> 8-bit grey PNG whose longer side is ``size`` (aspect kept)."""
    grey = Image.fromarray(np.rint(image * 255).astype(np.uint8))
    scale = size / max(grey.size)  # small images are enlarged too: every card shows the same size
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
    grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), resample)
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    return buf.getvalue()


def shard_sample_pixels(dataset: str | Path, shard: str, offset: int) -> tuple[np.ndarray, bool]:
    """(stored values, is CT) of the sample whose first tar member starts at ``offset`` in ``shard``."""
    with storage.open_read(storage.join(dataset, *shard.split("/"))) as f:
        f.seek(offset)
        with contextlib.closing(read_shard(f)) as samples:
            sample = next(samples, None)
    if sample is None:
        raise ValueError(f"{shard}: no sample at byte {offset}; was the dataset rewritten after `medssl embed`?")
    return decode_pixels(sample.pixels, sample.meta), sample.meta["intensity"]["semantics"] == "hounsfield"
