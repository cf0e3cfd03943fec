"""One entry point for all readers: detect the format from the bytes, then read."""

from __future__ import annotations

from pathlib import Path

from medssl.io.detect import detect_format
from medssl.io.dicom import read_dicom
from medssl.io.guard import stage
from medssl.io.nifti import read_nifti
from medssl.io.raster import read_raster
from medssl.io.source import Limits, Rejected, SourceImage


def read_image(path: Path, limits: Limits = Limits(), planes: list[str] | None = None, stride: int = 1,
               nifti_modality: str = "auto", raster_modality: str = "OT") -> SourceImage:
    """Open any supported file; raise :class:`Rejected` with a specific reason otherwise.

    Header problems are found before any pixel is decoded; decoding failures surface while iterating
    ``SourceImage.frames``, also as :class:`Rejected`. No other exception leaves a reader.
    """
    path = Path(path)
    with stage("unreadable_file", "reading the file's first bytes"):
        size = path.stat().st_size
        if size == 0:
            raise Rejected("empty_file", "zero-byte file")
        fmt = detect_format(path)
    if fmt is None:
        raise Rejected("not_an_image", "not DICOM, NIfTI, PNG, JPEG or TIFF (detected from the file's bytes)")
    if fmt == "dicom":
        return read_dicom(path, limits, stride)
    if fmt == "nifti":
        return read_nifti(path, limits, planes or ["axial"], stride, nifti_modality)
    return read_raster(path, fmt, limits, raster_modality)
