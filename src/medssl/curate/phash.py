"""A 64-bit perceptual hash (DCT pHash) of a shard sample, computed on what a reader of the image sees.

The sample's stored values are first brought to [0, 1] as a display shows them: CT (stored in HU) through
a window, everything else is already [0, 1]. Then the classic pHash of the ``imagehash`` package (Zauner
2010) on the 8-bit grey image: shrink to 32 x 32, 2D DCT, keep the 8 x 8 lowest frequencies, one bit per
coefficient: above their median or not. Two images that look alike differ in few bits; the Hamming
distance between hashes is the measure of "near-identical".

Why on the display mapping and not the raw HU: a CT slice is mostly air and bone in HU terms, and two
slices whose brain differs would hash alike; the soft-tissue window is how the encoder sees them too.
Flat images (e.g. all air inside the window) hash alike: every bit 0 but the DC term's.
"""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

from medssl.intensity import to_display
from medssl.shard_format import Sample, decode_pixels

HASH_SIDE = 8  # 8 x 8 coefficients -> 64 bits
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_SIDE * HASH_SIDE, dtype=np.uint64)[::-1]).astype(np.uint64)


def display_values(sample: Sample, ct_window: tuple[float, float]) -> np.ndarray:
    """The sample's pixels in [0, 1] as displayed: CT through ``ct_window`` (level, width in HU)."""
    hounsfield = sample.meta["intensity"]["semantics"] == "hounsfield"
    return to_display(decode_pixels(sample.pixels, sample.meta), hounsfield, ct_window)


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a 2D image in [0, 1] (any size), as an int (row-major bits, first bit high)."""
    grey = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))
    bits = imagehash.phash(grey, hash_size=HASH_SIDE).hash.ravel()
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def sample_hash(sample: Sample, ct_window: tuple[float, float]) -> int:
    return phash(display_values(sample, ct_window))
