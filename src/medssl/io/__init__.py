"""Readers that turn files (DICOM, NIfTI, PNG/JPEG/TIFF) into 2D frames plus metadata."""

from medssl.io.detect import detect_format
from medssl.io.read import read_image
from medssl.io.source import Frame, Limits, Rejected, SourceImage

__all__ = ["Frame", "Limits", "Rejected", "SourceImage", "detect_format", "read_image"]
