"""DICOM reader: pydicom with the pylibjpeg (libjpeg, openjpeg, RLE) decoder plugins.

Frames are decoded one at a time (bounded memory for long multi-frame files), converted to RGB
where the file stores palette or YBR colour, and passed through the modality LUT (rescale
slope/intercept, also from enhanced multi-frame functional groups), so CT frames come out in HU.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medssl.io.source import Frame, Limits, Rejected, SourceImage
from medssl.privacy import IDENTIFYING_KEYWORDS, scrub

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# pydicom logs header values (UIDs, names) in its warnings; keep them out of any log a user configures.
logging.getLogger("pydicom").propagate = False


def _functional_group_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of ``sequence`` that applies to frame ``index`` (per-frame first, then shared)."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        if groups not in ds:
            continue
        items = ds[groups].value
        item = items[index] if groups.startswith("PerFrame") and index < len(items) else items[0]
        if sequence in item and len(item[sequence].value):
            return item[sequence].value[0]
    return None


def _rescale(ds: Dataset, index: int) -> tuple[float, float] | None:
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    item = _functional_group_item(ds, index, "PixelValueTransformationSequence")
    if item is not None and "RescaleSlope" in item:
        return float(item.RescaleSlope), float(item.get("RescaleIntercept", 0))
    return None


def _first(value) -> float:
    return float(value[0] if isinstance(value, MultiValue) else value)


def _window(ds: Dataset, index: int) -> tuple[float, float] | None:
    source = ds if "WindowCenter" in ds else _functional_group_item(ds, index, "FrameVOILUTSequence")
    if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
        return None
    try:
        center, width = _first(source.WindowCenter), _first(source.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width > 0 else None


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for source in (ds, _functional_group_item(ds, 0, "PixelMeasuresSequence")):
        if source is None:
            continue
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            if keyword in source:
                try:
                    row, col = (float(v) for v in source[keyword].value)
                    return row, col
                except (TypeError, ValueError):
                    pass
    return None


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


def _ensure_transfer_syntax(ds: Dataset, path: Path) -> UID:
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


def _decode_error(exc: Exception, tsyntax: UID, identifiers: dict[str, str]) -> Rejected:
    text = scrub(" ".join(line.strip() for line in str(exc).splitlines()), identifiers)[:300]
    if isinstance(exc, NotImplementedError) or "no pixel data decoders" in str(exc).lower():
        return Rejected("unsupported_encoding", f"no installed decoder supports {tsyntax.name}")
    if "less than expected" in str(exc) or "truncated" in str(exc).lower():
        return Rejected("truncated", f"pixel data shorter than the header says ({tsyntax.name})")
    return Rejected("decode_failed", f"{tsyntax.name}: {type(exc).__name__}: {text}")


def read_dicom(path: Path, limits: Limits, stride: int = 1) -> SourceImage:
    # pydicom's warnings quote header values (UIDs, names): they must not reach logs or the console.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise Rejected("unreadable_dicom", f"pydicom cannot parse the header: {type(e).__name__}: {scrub(str(e))}") from None
    cut_short = any("End of file reached" in str(w.message) for w in caught)
    identifiers = _identifiers(ds)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if cut_short:
            raise Rejected("truncated", "the file ends before its pixel data is complete")
        sop = UID(str(ds.get("SOPClassUID", ""))).name if "SOPClassUID" in ds else "unknown SOP class"
        raise Rejected("no_pixel_data", f"DICOM object without pixel data ({sop}: e.g. a report, RT plan or DICOMDIR)")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if k not in ds]
    if missing:
        raise Rejected("bad_header", f"pixel data without the required element(s) {', '.join(missing)}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits_allocated = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as e:
        raise Rejected("bad_header", f"image pixel module incomplete: {scrub(str(e), identifiers)}") from None
    if rows <= 0 or cols <= 0 or n_frames <= 0:
        raise Rejected("bad_header", f"image size {rows}x{cols}x{n_frames} is empty")
    if max(rows, cols) > limits.max_frame_side:
        raise Rejected("too_large", f"frame {rows}x{cols} exceeds max_frame_side={limits.max_frame_side}")
    if rows * cols * n_frames * samples > limits.max_pixels:
        raise Rejected("too_large", f"{rows}x{cols}x{n_frames}x{samples} values exceed max_pixels={limits.max_pixels}")
    tsyntax = _ensure_transfer_syntax(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    colour = samples == 3 or photometric == "PALETTE COLOR"
    voi_lut_bits = None
    if not colour and "VOILUTSequence" in ds:
        try:
            voi_lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        except (AttributeError, IndexError, TypeError, ValueError):
            voi_lut_bits = None

    def frames() -> Iterator[Frame]:
        for index in range(0, n_frames, stride):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    arr = pixel_array(ds, index=index if n_frames > 1 else None)
                    if photometric == "PALETTE COLOR":
                        arr = apply_color_lut(arr, ds)
            except Exception as e:  # decoders raise many types; each becomes a specific rejection
                raise _decode_error(e, tsyntax, identifiers) from None
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            arr = arr.astype(np.float32) if colour else _to_modality_values(arr, ds, index)
            voi = None
            if voi_lut_bits is not None:
                voi = (lambda a, i=index: apply_voi_lut(np.rint(a).astype(np.int32), ds, index=i), voi_lut_bits)
            yield Frame(index=index, pixels=arr, window=None if colour else _window(ds, index), voi_lut=voi)

    sop_class = UID(str(ds.get("SOPClassUID", ""))).name if "SOPClassUID" in ds else None
    rescale = _rescale(ds, 0)
    info = {
        "transfer_syntax": tsyntax.name,
        "sop_class": sop_class,
        "photometric_original": photometric,
        "bits_allocated": bits_allocated,
        "pixel_representation": int(ds.get("PixelRepresentation", 0) or 0),
        "rescale": list(rescale) if rescale else None,
        "body_part": str(ds.get("BodyPartExamined", "")) or None,
        "manufacturer": str(ds.get("Manufacturer", "")) or None,
    }
    return SourceImage(
        format="dicom",
        modality=str(ds.get("Modality", "") or "OT").upper(),
        photometric="RGB" if colour else photometric,
        n_frames=len(range(0, n_frames, stride)),
        frame_shape=(rows, cols),
        spacing_mm=_spacing(ds),
        bits_stored=int(ds.get("BitsStored", bits_allocated) or bits_allocated),
        frames=frames(),
        info=info,
        identifiers=identifiers,
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
