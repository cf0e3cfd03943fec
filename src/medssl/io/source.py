"""The contract between readers and the rest of the system."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Rejected(Exception):
    """A file that cannot be ingested. ``code`` is a stable category, ``detail`` a human explanation.

    Details never contain header values (they could hold patient identifiers): readers word them
    from the file's structure only.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Guards against decompression bombs and absurd headers, checked before any pixel is decoded.

    ``max_memory_bytes`` is the memory budget for reading one file: every reader estimates, from the
    header alone, what decoding will hold at once (the encoded bytes it keeps plus one decoded frame and
    its float copies, ``FRAME_BYTES_PER_VALUE`` bytes per value) and rejects the file as ``too_large``
    when that exceeds the budget. The isolated decode worker enforces the same budget as a hard limit.
    """

    max_pixels: int = 1_000_000_000
    max_frame_side: int = 32768
    max_memory_bytes: int = 4 << 30


# Bytes per decoded value of one frame while it is processed: the decoder's array (up to 8), the
# float32 copy (4) and the intensity-mapped copy (4).
FRAME_BYTES_PER_VALUE = 16


@dataclass
class Frame:
    """One 2D image of a file: a DICOM frame, a volume slice or a whole raster image.

    ``pixels`` is (H, W) grey or (H, W, 3) RGB, in the file's stored values after the modality LUT
    (DICOM rescale slope/intercept), so CT frames are already in Hounsfield units.
    ``window`` is the DICOM VOI window (center, width) and ``voi_lut`` a VOI LUT (a function that applies
    it, and its output bit depth) that apply to this frame, when the file has them.
    """

    index: int
    pixels: np.ndarray
    plane: str = "2d"
    window: tuple[float, float] | None = None
    voi_lut: tuple[Callable[[np.ndarray], np.ndarray], int] | None = None  # (apply, output bits)


@dataclass
class SourceImage:
    """What a reader knows about a file, plus a lazy iterator over its frames (bounded memory)."""

    format: str                     # dicom | nifti | png | jpeg | tiff
    modality: str                   # DICOM modality code (CT, MR, CR, DX, US, ...), or configured/guessed
    photometric: str                # MONOCHROME1 | MONOCHROME2 | RGB (after palette/YBR conversion)
    n_frames: int
    frame_shape: tuple[int, ...]    # (H, W) of one frame before resizing
    spacing_mm: tuple[float, float] | None
    bits_stored: int | None
    frames: Iterator[Frame]
    # Facts for the sample metadata (never identifiers): transfer syntax, rescale, orientation, ...
    info: dict[str, Any] = field(default_factory=dict)
    # Identifying header values: hashed (salted) for linkage and scrubbed from any message. Never written.
    identifiers: dict[str, str] = field(default_factory=dict)
