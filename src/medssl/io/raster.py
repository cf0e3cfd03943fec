"""PNG / JPEG (Pillow) and TIFF (tifffile) reader, 8 and 16 bit, grey or colour, multi-page TIFF.

Stages and their codes: opening (``unreadable_image``), the declared size (``bad_header``, ``too_large``
against ``max_pixels``, ``max_frame_side`` and the memory budget; ``truncated`` when the file cannot hold
what it declares), then decoding (``truncated``, ``decode_failed``). A raster whose data ends early is
rejected, never zero-filled: Pillow fills the missing rows of a PNG whose deflate stream ends before the
image does with zeros and says nothing, so such PNGs are verified (see ``_check_png_complete``).

A JPEG whose entropy-coded data ends early but is closed by an end-of-image marker is not detected:
libjpeg decodes the missing blocks flat and Pillow reports nothing (a plainly truncated JPEG is rejected).

Layouts: 1 sample per pixel is grey, 3 are RGB, 4 are RGB plus alpha or an extra sample (dropped). Other
sample counts (a 2- or 5-channel TIFF: grey plus alpha, multispectral or microscopy channels) and CMYK are
rejected as ``unsupported_encoding``: reading some of their channels as grey or RGB would invent a meaning.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from medssl.io.guard import amount, check_deflate_ratio, check_memory, decoding, stage
from medssl.io.source import FRAME_BYTES_PER_VALUE, Frame, Limits, Rejected, SourceImage

_GREY_MODES = ("I;16", "I;16B", "I;16L", "I", "F", "L", "1", "LA")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_TIFF_DEFLATE = (8, 32946)  # COMPRESSION.ADOBE_DEFLATE, DEFLATE


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


def _png_layout(path: Path) -> tuple[int, int, int, int, bool]:
    """(width, height, bit depth, samples per pixel, interlaced) from the IHDR chunk (Pillow checked it)."""
    with open(path, "rb") as f:
        head = f.read(29)
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    return width, height, depth, _PNG_CHANNELS.get(colour_type, 4), interlace == 1


def _png_raw_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes the PNG's deflate stream must inflate to: each row (of each Adam7 pass) plus its filter byte."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if cols > 0 and rows > 0:
            total += rows * (1 + -(-cols * bits_per_pixel // 8))
    return total


def _png_inflated_at_least(path: Path, needed: int) -> bool:
    """Whether the IDAT stream inflates to ``needed`` bytes (output is counted and dropped, 1 MB at a time)."""
    inflater = zlib.decompressobj()
    produced = 0
    with open(path, "rb") as f:
        f.seek(8)
        while produced < needed and not inflater.eof:
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return False
            if kind != b"IDAT":
                f.seek(length + 4, 1)  # data and CRC
                continue
            data = f.read(length)
            while data and produced < needed and not inflater.eof:
                produced += len(inflater.decompress(data, 1 << 20))
                data = inflater.unconsumed_tail
            f.seek(4, 1)  # CRC
    return produced >= needed


def _check_png_complete(path: Path, img: Image.Image, raw_bytes: int, interlaced: bool) -> None:
    """Pillow zero-fills the rows a short deflate stream lacks. A zero-filled image ends in an all-zero row
    (for an interlaced one no row tells), so only then is the stream inflated again to count its bytes."""
    h, w = img.size[1], img.size[0]
    if not interlaced and np.asarray(img.crop((0, h - 1, w, h))).any():
        return
    with stage("decode_failed", "verifying the length of the PNG data"):
        complete = _png_inflated_at_least(path, raw_bytes)
    if not complete:
        raise Rejected("truncated", "the PNG data ends before the image does (Pillow would fill the rest with zeros)")


def _read_pillow(path: Path, fmt: str, limits: Limits, modality: str) -> SourceImage:
    name = fmt.upper()
    with stage("unreadable_image", f"opening the {name}"):
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:
            raise Rejected("too_large", f"{name} declares more than twice max_pixels={limits.max_pixels}") from None
        w, h = img.size
        bands = len(img.getbands())
    _check_size(h, w, 1, limits)
    file_size = path.stat().st_size
    if fmt == "png":
        with stage("unreadable_image", "reading the PNG header"):
            _, _, depth, samples, interlaced = _png_layout(path)
        raw_bytes = _png_raw_bytes(w, h, depth * samples, interlaced)
        check_deflate_ratio(raw_bytes, file_size, "the PNG")
    values = h * w * max(bands, 1 if img.mode in _GREY_MODES else 3)
    check_memory(file_size + values * FRAME_BYTES_PER_VALUE, limits, f"the {name} image")
    with decoding(f"decoding the {name}"):
        img.load()
    if fmt == "png":
        _check_png_complete(path, img, raw_bytes, interlaced)
    with decoding(f"converting the {name} ({img.mode})"):
        arr = _pillow_array(img)
    bits = 8 if arr.dtype == np.uint8 else 16 if arr.dtype.itemsize == 2 or img.mode.startswith("I") else 32
    if bits == 16 and arr.dtype != np.uint16:
        arr = arr.astype(np.int64)
        bits = 16 if arr.max(initial=0) < 65536 and arr.min(initial=0) >= 0 else 32
    return SourceImage(
        format=fmt, modality=modality, photometric="RGB" if arr.ndim == 3 else "MONOCHROME2",
        n_frames=1, frame_shape=(h, w), spacing_mm=None, bits_stored=bits,
        frames=iter([Frame(index=0, pixels=arr.astype(np.float32))]), info={"mode": img.mode},
    )


def _page_samples(page, i: int) -> int:
    """Samples per pixel of TIFF page ``i`` (1, 3 or 4); other layouts are rejected."""
    separate, depth, _, _, contig = page.shaped
    samples = separate * contig
    if depth != 1:
        raise Rejected("unsupported_encoding", f"TIFF page {i} is a 3D block ({depth} planes deep)")
    if samples not in (1, 3, 4):
        raise Rejected("unsupported_encoding", f"TIFF page {i} has {samples} samples per pixel (1, 3 or 4 supported)")
    if samples == 4 and int(page.photometric) != 2:  # 2 = RGB (+ alpha); 4 samples otherwise is CMYK or the like
        raise Rejected("unsupported_encoding", f"TIFF page {i} has 4 samples per pixel that are not RGB plus alpha")
    if page.dtype is None or page.dtype.kind not in "biuf":
        raise Rejected("unsupported_encoding", f"TIFF page {i} has a sample type that is not integer or float")
    return samples


def _page_size(page) -> tuple[int, int]:
    _, _, h, w, _ = page.shaped
    return int(h), int(w)  # a corrupt tag count makes a tuple here: TypeError, a bad_header


def _check_page(page, i: int, file_size: int, limits: Limits) -> int:
    """Size, truncation and memory of TIFF page ``i``, from its tags alone; returns its samples per pixel."""
    h, w = _page_size(page)
    _check_size(h, w, 1, limits)
    samples = _page_samples(page, i)
    offsets, counts = page.dataoffsets, page.databytecounts
    if not counts or any(c <= 0 for c in counts):
        raise Rejected("truncated", f"TIFF page {i} has strips or tiles without data")
    if any(o + c > file_size for o, c in zip(offsets, counts)):
        raise Rejected("truncated", f"TIFF page {i} has strips or tiles beyond the end of the file")
    encoded = sum(counts)
    raw = h * w * samples * page.bitspersample // 8
    if int(page.compression) == 1 and encoded < raw:
        raise Rejected("truncated", f"TIFF page {i} holds {amount(encoded)} of uncompressed data for {amount(raw)}")
    if int(page.compression) in _TIFF_DEFLATE:
        check_deflate_ratio(raw, encoded, f"TIFF page {i}")
    check_memory(encoded + h * w * samples * FRAME_BYTES_PER_VALUE, limits, f"TIFF page {i}")
    return samples


def _read_tiff(path: Path, limits: Limits, modality: str) -> SourceImage:
    with stage("unreadable_image", "opening the TIFF"):
        tif = tifffile.TiffFile(path)
    try:
        with stage("unreadable_image", "reading the TIFF page tags"):
            pages = tif.pages
            n_pages = len(pages)
            first = pages[0]
        file_size = path.stat().st_size
        with stage("bad_header", "reading the tags of TIFF page 0"):
            h, w = _page_size(first)
            _check_size(h, w, n_pages, limits)
            colour = _check_page(first, 0, file_size, limits) > 1
            dtype = first.dtype
    except BaseException:
        tif.close()
        raise

    def frames() -> Iterator[Frame]:
        with tif:
            for i in range(n_pages):
                with stage("bad_header", f"reading the tags of TIFF page {i}"):
                    page = pages[i]
                    if (_check_page(page, i, file_size, limits) > 1) != colour:
                        raise Rejected("unsupported_encoding", f"TIFF page {i} is {'grey' if colour else 'colour'}, "
                                                               f"page 0 {'colour' if colour else 'grey'}")
                with decoding(f"decoding TIFF page {i}"):
                    arr = page.asarray()
                if arr.ndim == 3 and int(page.planarconfig) == 2:  # separate planes: (samples, h, w)
                    arr = np.moveaxis(arr, 0, -1)
                if arr.ndim == 3 and arr.shape[-1] == 4:
                    arr = arr[..., :3]
                if arr.shape[:2] != _page_size(page) or arr.ndim != (3 if colour else 2):
                    raise Rejected("decode_failed", f"TIFF page {i} decoded to shape {arr.shape}, not its tags' layout")
                yield Frame(index=i, pixels=arr.astype(np.float32))

    return SourceImage(
        format="tiff", modality=modality, photometric="RGB" if colour else "MONOCHROME2",
        n_frames=n_pages, frame_shape=(h, w), spacing_mm=None, bits_stored=dtype.itemsize * 8,
        frames=frames(), info={"dtype": str(dtype)},
    )


def read_raster(path: Path, fmt: str, limits: Limits, modality: str) -> SourceImage:
    if fmt == "tiff":
        return _read_tiff(path, limits, modality)
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow's own decompression-bomb guard agrees with ours
    return _read_pillow(path, fmt, limits, modality)
