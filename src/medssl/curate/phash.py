"""A 64-bit perceptual hash (DCT pHash) of a shard sample, computed on what a reader of the image sees.

The sample's stored values are first brought to [0, 1] as a display shows them: CT (stored in HU) through
a window, everything else is already [0, 1]. Then the classic pHash (Zauner 2010, as in the ``imagehash``
package): shrink to 32 x 32 by area averaging, 2D DCT-II, keep the 8 x 8 lowest frequencies, one bit
per coefficient: above their median or not. Two images that look alike differ in few bits; the
Hamming distance between hashes is the measure of "near-identical".

Why on the display mapping and not the raw HU: a CT slice is mostly air and bone in HU terms, and two
slices whose brain differs would hash alike; the soft-tissue window is how the encoder sees them too.
Flat images (e.g. all air inside the window) hash alike: every bit 0 but the DC term's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from medssl.shard_format import Sample, decode_pixels

HASH_SIDE = 8           # 8 x 8 coefficients -> 64 bits
SHRINK_SIDE = 32        # the image is shrunk to 32 x 32 before the DCT (imagehash's highfreq_factor 4)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` is the DCT of a column vector ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_DCT = _dct_matrix(SHRINK_SIDE)[:HASH_SIDE]   # only the low-frequency rows are ever used
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_SIDE * HASH_SIDE, dtype=np.uint64)[::-1]).astype(np.uint64)


def display_values(sample: Sample, ct_window: tuple[float, float]) -> np.ndarray:
    """The sample's pixels in [0, 1] as displayed: CT through ``ct_window`` (level, width in HU)."""
    values = decode_pixels(sample.pixels, sample.meta)
    if sample.meta["intensity"]["semantics"] == "hounsfield":
        level, width = ct_window
        values = (values - (level - width / 2)) / width
    return np.clip(values, 0.0, 1.0)


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a 2D image in [0, 1] (any size), as an int."""
    small = np.asarray(Image.fromarray(image.astype(np.float32))
                       .resize((SHRINK_SIDE, SHRINK_SIDE), Image.Resampling.BOX), dtype=np.float64)
    low = _DCT @ small @ _DCT.T                     # 8 x 8 lowest frequencies, DC included
    bits = (low > np.median(low)).ravel()
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def sample_hash(sample: Sample, ct_window: tuple[float, float]) -> int:
    return phash(display_values(sample, ct_window))
