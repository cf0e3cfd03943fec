"""DICOM reader: pydicom with the pylibjpeg (libjpeg, openjpeg, RLE) decoder plugins.

Frames are decoded one at a time (bounded memory for long multi-frame files), converted to RGB
where the file stores palette or YBR colour, and passed through the modality LUT (rescale
slope/intercept, also from enhanced multi-frame functional groups), so CT frames come out in HU.

Reading goes in stages, each mapping any failure to its own code (``guard.stage``): parsing
(``unreadable_dicom``), the image header (``bad_header``, ``too_large``, ``unsupported_encoding``,
``truncated``), then per frame decoding (``decode_failed``, ``truncated``, ``decoder_crash``) and the
value transforms (``bad_header``). Everything that can be checked from the header is checked before the
first pixel is decoded, including the memory decoding will need.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from medssl.io.codestream import declared_size, jp2_box_error
from medssl.io.dicom_deflate import is_deflated, read_deflated
from medssl.io.dicom_header import PixelHeader, uid_name
from medssl.io.guard import check_memory, decoding, stage
from medssl.io.source import FRAME_BYTES_PER_VALUE, Frame, Limits, Rejected, SourceImage
from medssl.privacy import IDENTIFYING_KEYWORDS

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")  # DICOM CS value (Modality, BodyPartExamined)

# pydicom logs header values (UIDs, names) in its warnings; keep them out of any log a user configures.
logging.getLogger("pydicom").propagate = False


def _functional_group_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of ``sequence`` that applies to frame ``index`` (per-frame first, then shared)."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(groups)
        if not items:
            continue
        item = items[index] if groups.startswith("PerFrame") and index < len(items) else items[0]
        inner = item.get(sequence)
        if inner:
            return inner[0]
    return None


def _first(value) -> float:
    return float(value[0] if isinstance(value, MultiValue) else value)


def _number(source: Dataset, keyword: str, default: float) -> float:
    value = source.get(keyword)
    return default if value is None or value == "" else _first(value)


def _rescale(ds: Dataset, index: int) -> tuple[float, float] | None:
    """(slope, intercept) for frame ``index``; ``bad_header`` when they cannot be applied."""
    source = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else \
        _functional_group_item(ds, index, "PixelValueTransformationSequence")
    if source is None or "RescaleSlope" not in source and "RescaleIntercept" not in source:
        return None
    slope, intercept = _number(source, "RescaleSlope", 1.0), _number(source, "RescaleIntercept", 0.0)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise Rejected("bad_header", "RescaleSlope or RescaleIntercept is not a finite number")
    if slope == 0:
        raise Rejected("bad_header", "RescaleSlope is 0 (every pixel would have the same value)")
    return slope, intercept


def _window(ds: Dataset, index: int) -> tuple[float, float] | None:
    """The VOI window of frame ``index``; None when absent or unusable (a window is optional)."""
    try:
        source = ds if "WindowCenter" in ds else _functional_group_item(ds, index, "FrameVOILUTSequence")
        if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
            return None
        center, width = _first(source.WindowCenter), _first(source.WindowWidth)
    except Exception:  # a malformed window is ignored: intensities then follow the image's own range
        return None
    return (center, width) if math.isfinite(center) and math.isfinite(width) and width > 0 else None


def _voi_lut(ds: Dataset, index: int) -> tuple[Callable[[np.ndarray], np.ndarray], int] | None:
    """The VOI LUT of frame ``index`` as (apply, output bits); applied later, so failures are mapped here."""
    try:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    except Exception:  # a malformed VOI LUT is ignored, like a malformed window
        return None
    if not 1 <= bits <= 16:
        return None

    def apply(values: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings(), stage("bad_header", f"applying the VOI LUT to frame {index}"):
            warnings.simplefilter("ignore")  # pydicom's warnings quote header values
            return apply_voi_lut(np.rint(values).astype(np.int32), ds, index=index)

    return apply, bits


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for source in (ds, _functional_group_item(ds, 0, "PixelMeasuresSequence")):
        if source is None:
            continue
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            if keyword in source:
                try:
                    row, col = (float(v) for v in source[keyword].value)
                except (TypeError, ValueError):
                    continue
                if all(math.isfinite(v) and v > 0 for v in (row, col)):
                    return row, col
    return None


def _code_string(ds: Dataset, keyword: str) -> str | None:
    """A CS value such as Modality, or None when it is not one (a hostile file may put anything there)."""
    value = str(ds.get(keyword, "") or "").strip().upper()
    return value if _CODE_STRING.fullmatch(value) else None


def _identifiers(ds: Dataset) -> dict[str, str]:
    found = {}
    for keyword in IDENTIFYING_KEYWORDS:
        value = ds.get(keyword)
        if value not in (None, ""):
            found[keyword] = str(value)
    for meta_keyword in ("MediaStorageSOPInstanceUID",):
        value = getattr(getattr(ds, "file_meta", None), meta_keyword, None)
        if value:
            found[meta_keyword] = str(value)
    return found


def _ensure_transfer_syntax(ds: Dataset) -> UID:
    """Files written without a Transfer Syntax UID: infer it from how the data set was encoded."""
    tsyntax = getattr(ds.file_meta, "TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    if tsyntax:
        return UID(tsyntax)
    encapsulated = "PixelData" in ds and ds["PixelData"].is_undefined_length
    if encapsulated:
        raise Rejected("unknown_transfer_syntax", "compressed pixel data but no Transfer Syntax UID in the file meta")
    implicit, little = ds.original_encoding
    if implicit is None:
        raise Rejected("unknown_transfer_syntax", "no Transfer Syntax UID and the encoding cannot be inferred")
    tsyntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = tsyntax
    return tsyntax


def _read_dataset(path: Path, limits: Limits) -> tuple[Dataset, int]:
    """The parsed data set and the bytes of it held in memory (the whole file, or the inflated data set)."""
    if is_deflated(path):
        return read_deflated(path, limits)
    size = path.stat().st_size
    check_memory(size, limits, "the file (read whole)")
    return pydicom.dcmread(path, force=True), size


def _check_decoder(tsyntax: UID, syntax: str) -> None:
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise Rejected("unsupported_encoding", f"pixel data in {syntax}, which no decoder supports") from None
    if not decoder.is_available:
        raise Rejected("unsupported_encoding", f"no installed decoder supports {syntax}")


def _check_native_length(ds: Dataset, header: PixelHeader) -> None:
    """Uncompressed pixel data shorter than the header declares is truncated (caught before decoding)."""
    keyword = next(k for k in _PIXEL_KEYWORDS if k in ds)
    held, declared = len(ds[keyword].value or b""), header.native_bytes()
    if held < declared:
        raise Rejected("truncated", f"the pixel data holds {held:,} bytes, the header declares {declared:,}")


def _codestreams(ds: Dataset, header: PixelHeader, tsyntax: UID) -> Iterator[bytes] | None:
    """The encoded frames, in order, for the syntaxes whose decoders size their output from the codestream
    (JPEG, JPEG-LS, JPEG 2000); None for the others (RLE is sized from the DICOM header)."""
    if not tsyntax.is_encapsulated or tsyntax == RLELossless:
        return None
    extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths) if "ExtendedOffsetTable" in ds else None
    return generate_frames(ds.PixelData, number_of_frames=header.frames, extended_offsets=extended)


def _check_codestream(frame: bytes | None, index: int, header: PixelHeader) -> None:
    """A codestream may not declare more values than the DICOM header: the decoder would allocate them."""
    if frame is None:
        raise Rejected("truncated", f"frame {index} is missing from the encapsulated pixel data")
    box_error = jp2_box_error(frame)
    if box_error:
        raise Rejected("decode_failed", f"frame {index}: {box_error}")
    size = declared_size(frame)
    if size is not None and size[0] * size[1] * size[2] > header.rows * header.cols * header.samples:
        raise Rejected("decode_failed", f"the codestream of frame {index} declares {size[0]}x{size[1]}x{size[2]} "
                                        f"values, more than the header's {header.rows}x{header.cols}x{header.samples}")


def read_dicom(path: Path, limits: Limits, stride: int = 1) -> SourceImage:
    # pydicom's warnings quote header values (UIDs, names): they must not reach logs or the console.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stage("unreadable_dicom", "parsing the DICOM data set"):
            ds, held_bytes = _read_dataset(path, limits)
    cut_short = any("End of file reached" in str(w.message) for w in caught)
    with warnings.catch_warnings(), stage("bad_header", "reading the image header"):
        warnings.simplefilter("ignore")
        return _source_image(ds, held_bytes, cut_short, limits, stride)


def _frame(ds: Dataset, header: PixelHeader, index: int, syntax: str) -> Frame:
    """Decode frame ``index`` and map it to modality values (or RGB), with its VOI window or LUT."""
    with decoding(f"decoding frame {index} of {syntax} pixel data"):
        # allow_excess_frames=False: pixel data longer than the header says must not add frames to this one
        arr = pixel_array(ds, index=index if header.frames > 1 else None, allow_excess_frames=False)
    with stage("bad_header", f"applying the colour or modality LUT to frame {index}"):
        if header.palette:
            arr = apply_color_lut(arr, ds)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        arr = arr.astype(np.float32) if header.colour else _to_modality_values(arr, ds, index)
    expected = (header.rows, header.cols, 3) if header.colour else (header.rows, header.cols)
    if arr.shape != expected:
        raise Rejected("decode_failed", f"frame {index} decoded to shape {arr.shape}, the header declares {expected}")
    if header.colour:
        return Frame(index=index, pixels=arr)
    voi = _voi_lut(ds, index) if "VOILUTSequence" in ds else None
    return Frame(index=index, pixels=arr, window=_window(ds, index), voi_lut=voi)


def _source_image(ds: Dataset, held_bytes: int, cut_short: bool, limits: Limits, stride: int) -> SourceImage:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if cut_short:
            raise Rejected("truncated", "the file ends before its pixel data is complete")
        sop = uid_name(ds.get("SOPClassUID"), "SOP class") if "SOPClassUID" in ds else "no SOP Class UID"
        raise Rejected("no_pixel_data", f"DICOM object without pixel data ({sop}: e.g. a report, RT plan or DICOMDIR)")
    header = PixelHeader.of(ds)
    header.check_size(limits)
    tsyntax = _ensure_transfer_syntax(ds)
    syntax = uid_name(tsyntax, "transfer syntax")
    _check_decoder(tsyntax, syntax)
    if not tsyntax.is_encapsulated:
        _check_native_length(ds, header)
    check_memory(held_bytes + header.frame_values() * FRAME_BYTES_PER_VALUE, limits, "the DICOM file")
    rescale = _rescale(ds, 0)
    codestreams = _codestreams(ds, header, tsyntax)

    def frames() -> Iterator[Frame]:
        for index in range(0, header.frames, stride):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's warnings quote header values
                if codestreams is not None:
                    with decoding(f"reading frame {index} of the encapsulated pixel data"):
                        for _ in range(stride - 1 if index else 0):  # the frames skipped by the stride
                            next(codestreams, None)
                        _check_codestream(next(codestreams, None), index, header)
                frame = _frame(ds, header, index, syntax)
            yield frame

    info = {
        "transfer_syntax": syntax,
        "sop_class": uid_name(ds.get("SOPClassUID"), "SOP class") if "SOPClassUID" in ds else None,
        "photometric_original": header.photometric,
        "bits_allocated": header.bits_allocated,
        "pixel_representation": int(ds.get("PixelRepresentation", 0) or 0),
        "rescale": list(rescale) if rescale else None,
        "body_part": _code_string(ds, "BodyPartExamined"),
        "manufacturer": str(ds.get("Manufacturer", "")) or None,
    }
    return SourceImage(
        format="dicom",
        modality=_code_string(ds, "Modality") or "OT",
        photometric="RGB" if header.colour else header.photometric,
        n_frames=len(range(0, header.frames, stride)),
        frame_shape=(header.rows, header.cols),
        spacing_mm=_spacing(ds),
        bits_stored=int(ds.get("BitsStored", header.bits_allocated) or header.bits_allocated),
        frames=frames(),
        info=info,
        identifiers=_identifiers(ds),
    )


def _to_modality_values(arr: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Stored values -> modality values (HU for CT) via the Modality LUT or rescale slope/intercept."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    rescale = _rescale(ds, index)
    out = arr.astype(np.float32)
    if rescale is not None:
        slope, intercept = rescale
        out = out * np.float32(slope) + np.float32(intercept)
    return out
