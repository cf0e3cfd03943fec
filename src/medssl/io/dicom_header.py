"""The image pixel module of a DICOM data set, validated, and what its pixel data will cost to hold.

Used before any pixel is decoded: by the DICOM reader, and while a deflated data set is still being
inflated (to know where the inflation must stop).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from medssl.io.guard import stage
from medssl.io.source import Limits, Rejected

_BITS_ALLOCATED = (1, 8, 16, 32, 64)
_REQUIRED = ("Rows", "Columns", "BitsAllocated")


def uid_name(value, kind: str) -> str:
    """The registered name of a UID, or words for one pydicom does not know: an unknown UID may be private
    to a site or vendor, and a header value is never quoted in a reason or written to the output."""
    try:
        uid = UID(str(value).strip())
        name = uid.name
    except Exception:  # a malformed value is simply not a known UID
        return f"a non-standard {kind}"
    return name if name != str(uid) else f"a non-standard {kind}"


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """An integer element; ``default`` when it is absent or empty."""
    value = ds.get(keyword)
    return default if value is None or value == "" else int(value)


def has_image_module(ds: Dataset) -> bool:
    return all(k in ds for k in _REQUIRED)


@dataclass(frozen=True)
class PixelHeader:
    rows: int
    cols: int
    frames: int
    samples: int
    bits_allocated: int
    photometric: str

    @classmethod
    def of(cls, ds: Dataset) -> PixelHeader:
        """Read and validate the image pixel module; ``bad_header`` (or ``unsupported_encoding``) otherwise."""
        missing = [k for k in _REQUIRED if k not in ds]
        if missing:
            raise Rejected("bad_header", f"pixel data without the required element(s) {', '.join(missing)}")
        with stage("bad_header", "reading the image pixel module"):
            header = cls(
                rows=int(ds.Rows), cols=int(ds.Columns),
                frames=_int(ds, "NumberOfFrames", 1) or 1,  # 0 is read as one frame, as pydicom does
                samples=_int(ds, "SamplesPerPixel", 1),
                bits_allocated=int(ds.BitsAllocated),
                photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper(),
            )
            bits_stored = _int(ds, "BitsStored", header.bits_allocated)
            representation = _int(ds, "PixelRepresentation", 0)
        header._validate(bits_stored, representation)
        return header

    def _validate(self, bits_stored: int, representation: int) -> None:
        if self.rows <= 0 or self.cols <= 0 or self.frames <= 0:
            raise Rejected("bad_header", f"image size {self.rows}x{self.cols}x{self.frames} is empty")
        if self.bits_allocated not in _BITS_ALLOCATED:
            raise Rejected("bad_header", f"BitsAllocated is {self.bits_allocated} (1, 8, 16, 32 or 64 expected)")
        if not 1 <= bits_stored <= self.bits_allocated:
            raise Rejected("bad_header", f"BitsStored is {bits_stored} with BitsAllocated {self.bits_allocated}")
        if representation not in (0, 1):
            raise Rejected("bad_header", f"PixelRepresentation is {representation} (0 or 1 expected)")
        if self.samples <= 0:
            raise Rejected("bad_header", f"SamplesPerPixel is {self.samples}")
        if self.samples not in (1, 3):
            raise Rejected("unsupported_encoding", f"{self.samples} samples per pixel (1 or 3 supported)")

    @property
    def palette(self) -> bool:
        return self.photometric == "PALETTE COLOR"

    @property
    def colour(self) -> bool:
        return self.samples == 3 or self.palette

    def frame_values(self) -> int:
        """Values of one decoded frame (a palette frame becomes RGB)."""
        return self.rows * self.cols * (3 if self.colour else 1)

    def native_bytes(self) -> int:
        """Bytes of uncompressed pixel data the header declares (all frames; PS3.5 8.1.1, PS3.3 C.7.6.3.1.2)."""
        values = self.rows * self.cols * self.frames * self.samples
        length = (values + 7) // 8 if self.bits_allocated == 1 else values * self.bits_allocated // 8
        return length // 3 * 2 if self.photometric == "YBR_FULL_422" else length

    def check_size(self, limits: Limits) -> None:
        if max(self.rows, self.cols) > limits.max_frame_side:
            raise Rejected("too_large", f"frame {self.rows}x{self.cols} exceeds max_frame_side={limits.max_frame_side}")
        if self.rows * self.cols * self.frames * self.samples > limits.max_pixels:
            raise Rejected("too_large", f"{self.rows}x{self.cols}x{self.frames}x{self.samples} values exceed "
                                        f"max_pixels={limits.max_pixels}")
