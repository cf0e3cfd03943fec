"""Modality-aware intensity mapping: what a pixel value means, made explicit and recorded.

Two conventions leave this module, each recorded in the sample's metadata:
- ``hounsfield``: CT in Hounsfield units over the full range (only values below air, -1024 HU, are
  clipped: they are padding outside the field of view). Windowing stays a training-time augmentation.
- ``normalized``: values in [0, 1] where 1 is bright on a display. MR by robust percentiles (scanner
  units are arbitrary); radiographs and other modalities through their VOI window / VOI LUT when the
  file has one, else by bit depth (8 bit) or robust percentiles; MONOCHROME1 inverted; colour
  (ultrasound, screen captures) to grey with the ITU-R BT.601 luma weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medssl.io.source import Frame, SourceImage

AIR_HU = -1024.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class Intensity:
    """How the values of a mapped frame are to be read, and the steps that produced them."""

    semantics: str                # hounsfield | normalized
    unit: str                     # HU | 1
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"semantics": self.semantics, "unit": self.unit, "steps": self.steps}


def _percentile_scale(values: np.ndarray, percentiles: tuple[float, float], steps: list[str]) -> np.ndarray:
    if float(values.max()) - float(values.min()) > _FLOAT32_MAX:
        # Values near the float32 limits (e.g. a float TIFF holding +-3e38): their differences overflow
        # float32 to inf and every value would scale to 0, so this frame is scaled in float64.
        values = values.astype(np.float64)
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if hi <= lo:  # e.g. a sparse mask: fewer bright pixels than the upper percentile
        lo, hi = float(values.min()), float(values.max())
    steps.append(f"range [{lo:.6g}, {hi:.6g}] (percentiles {percentiles[0]}-{percentiles[1]}) to [0, 1]")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function, to [0, 1]."""
    if width <= 1:
        return (values > center - 0.5).astype(np.float32)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _display_scale(source: SourceImage, frame: Frame, values: np.ndarray, percentiles, steps: list[str]) -> np.ndarray:
    """Radiographs and other modalities: follow the file's own display intent where it has one."""
    out = None
    if frame.voi_lut is not None:
        apply, bits = frame.voi_lut
        out = apply(values).astype(np.float32) / float(2**bits - 1)
        steps.append(f"VOI LUT ({bits} bit) to [0, 1]")
    elif frame.window is not None:
        out = _window(values, *frame.window)
        steps.append(f"VOI window center {frame.window[0]:.6g} width {frame.window[1]:.6g} to [0, 1]")
    if out is not None and np.ptp(out) == 0:
        steps.append("VOI ignored: it maps the whole image to one value")
        out = None
    if out is None:
        bits = source.bits_stored
        if source.photometric == "RGB" or (bits is not None and bits <= 8 and values.min() >= 0):
            top = 255.0 if source.photometric == "RGB" else float(2**bits - 1)
            top = max(top, float(values.max()))
            out = values / top
            steps.append(f"divided by {top:.6g} (8-bit display values) to [0, 1]")
        else:
            out = _percentile_scale(values, percentiles, steps)
    if source.photometric == "MONOCHROME1":
        out = 1.0 - out
        steps.append("MONOCHROME1 inverted (bright = dense)")
    return out


def map_frame(source: SourceImage, frame: Frame,
              percentiles: tuple[float, float]) -> tuple[np.ndarray, Intensity] | None:
    """Map one frame to float32 values in the modality's convention; None if the frame is empty (constant)."""
    values = frame.pixels
    steps: list[str] = []
    if values.ndim == 3:
        values = values[..., :3] @ _LUMA
        steps.append("colour to grey (BT.601 luma)")
    if values.min() == values.max():  # (not np.ptp: the difference can overflow float32)
        return None
    if source.modality == "CT" and source.photometric != "RGB":
        steps.append(f"Hounsfield units, clipped below {AIR_HU:g} (padding outside the field of view)")
        return np.maximum(values, AIR_HU).astype(np.float32), Intensity("hounsfield", "HU", steps)
    if source.modality == "MR" and source.photometric != "RGB":
        out = _percentile_scale(values, percentiles, steps)
    else:
        out = _display_scale(source, frame, values, percentiles, steps)
    return out.astype(np.float32), Intensity("normalized", "1", steps)


def to_display(values: np.ndarray, hounsfield: bool, ct_window: tuple[float, float]) -> np.ndarray:
    """A sample's values in its convention -> [0, 1] as a viewer shows them: ``hounsfield`` values through
    ``ct_window`` (level, width in HU); ``normalized`` values are already display values."""
    if hounsfield:
        level, width = ct_window
        values = (values - (level - width / 2)) / width
    return np.clip(values, 0.0, 1.0)
