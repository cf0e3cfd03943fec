"""PNG / JPEG (Pillow) and TIFF (tifffile) reader, 8 and 16 bit, grey or colour, multi-page TIFF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from medssl.io.source import Frame, Limits, Rejected, SourceImage


def _check_size(h: int, w: int, pages: int, limits: Limits) -> None:
    if h <= 0 or w <= 0:
        raise Rejected("bad_header", f"image size {h}x{w} is empty")
    if max(h, w) > limits.max_frame_side:
        raise Rejected("too_large", f"image {h}x{w} exceeds max_frame_side={limits.max_frame_side}")
    if h * w * pages > limits.max_pixels:
        raise Rejected("too_large", f"image {h}x{w}x{pages} exceeds max_pixels={limits.max_pixels}")


def _pillow_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
        return np.asarray(img)
    if img.mode in ("1", "LA"):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))  # P, RGBA, CMYK, YCbCr, ...


def _read_pillow(path: Path, fmt: str, limits: Limits, modality: str) -> SourceImage:
    try:
        img = Image.open(path)
        w, h = img.size
    except Image.DecompressionBombError:
        raise Rejected("too_large", f"{fmt.upper()} declares more than twice max_pixels={limits.max_pixels}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Rejected("unreadable_image", f"Pillow cannot open the {fmt.upper()}: {type(e).__name__}") from None
    _check_size(h, w, 1, limits)
    try:
        arr = _pillow_array(img)
    except (OSError, SyntaxError, ValueError) as e:
        code = "truncated" if "truncated" in str(e).lower() else "decode_failed"
        raise Rejected(code, f"{fmt.upper()} data cannot be decoded: {type(e).__name__}: {e}") from None
    bits = 8 if arr.dtype == np.uint8 else 16 if arr.dtype.itemsize == 2 or img.mode.startswith("I") else 32
    if bits == 16 and arr.dtype != np.uint16:
        arr = arr.astype(np.int64)
        bits = 16 if arr.max(initial=0) < 65536 and arr.min(initial=0) >= 0 else 32
    return SourceImage(
        format=fmt, modality=modality, photometric="RGB" if arr.ndim == 3 else "MONOCHROME2",
        n_frames=1, frame_shape=(h, w), spacing_mm=None, bits_stored=bits,
        frames=iter([Frame(index=0, pixels=arr.astype(np.float32))]), info={"mode": img.mode},
    )


def _read_tiff(path: Path, limits: Limits, modality: str) -> SourceImage:
    try:
        tif = tifffile.TiffFile(path)
        pages = tif.pages
        first = pages[0]
        shape, dtype = first.shape, first.dtype
    except Exception as e:  # tifffile raises many types for malformed files
        raise Rejected("unreadable_image", f"tifffile cannot open the TIFF: {type(e).__name__}") from None
    planar = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)  # RGB stored plane by plane
    colour = len(shape) == 3 and (planar or shape[-1] in (3, 4))
    h, w = shape[1:] if planar else shape[:2]
    _check_size(h, w, len(pages), limits)

    def frames() -> Iterator[Frame]:
        with tif:
            for i, page in enumerate(pages):
                try:
                    arr = page.asarray()
                except Exception as e:
                    raise Rejected("decode_failed", f"TIFF page {i} cannot be decoded: {type(e).__name__}") from None
                if planar:
                    arr = np.moveaxis(arr, 0, -1)
                if arr.ndim == 3 and arr.shape[-1] == 4:
                    arr = arr[..., :3]
                if arr.ndim != (3 if colour else 2):
                    raise Rejected("bad_header", f"TIFF page {i} has shape {arr.shape}, expected {shape}")
                yield Frame(index=i, pixels=arr.astype(np.float32))

    return SourceImage(
        format="tiff", modality=modality, photometric="RGB" if colour else "MONOCHROME2",
        n_frames=len(pages), frame_shape=(h, w), spacing_mm=None, bits_stored=dtype.itemsize * 8,
        frames=frames(), info={"dtype": str(dtype)},
    )


def read_raster(path: Path, fmt: str, limits: Limits, modality: str) -> SourceImage:
    if fmt == "tiff":
        return _read_tiff(path, limits, modality)
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow's own decompression-bomb guard agrees with ours
    return _read_pillow(path, fmt, limits, modality)
