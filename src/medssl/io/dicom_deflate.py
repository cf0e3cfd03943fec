"""Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99): inflated block by block, bounded by its header.

pydicom inflates the whole data set in one call before anything can be checked, so a few hundred KB
can cost seconds and hundreds of MB. Here the inflated prefix is parsed as it grows (with pydicom's own
dataset reader); once it reaches past the image pixel module (group 0028), the declared pixel data is
checked against the limits and the memory budget, and inflation stops with ``too_large`` as soon as the
data set grows beyond what the header declares plus an allowance for the other elements. The inflated
bytes are then parsed by pydicom exactly as ``dcmread`` would.
"""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO

# pydicom's own file meta reader (private): the transfer syntax seen here is then the one dcmread would act on,
# including its retry of a file meta written in implicit VR. It leaves the file at the start of the data set.
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medssl.io.dicom_header import PixelHeader, has_image_module
from medssl.io.guard import amount, check_deflate_ratio, check_memory, decoding
from medssl.io.source import FRAME_BYTES_PER_VALUE, Limits, Rejected

_BLOCK = 1 << 16          # compressed bytes read at a time
_STEP = 1 << 20           # most inflated bytes one call may produce (a bomb cannot balloon within a call)
_FIRST_LOOK = 1 << 16     # inflated bytes before the first look for the image pixel module; doubles after
# Inflated bytes allowed besides the declared pixel data: every other element (text, private blocks, icon
# images) before the image pixel module is known, and in total; per-frame functional groups add per frame.
NON_PIXEL_ALLOWANCE = 16 << 20
PER_FRAME_ALLOWANCE = 8 << 10


def is_deflated(path: Path) -> bool:
    """Whether the file meta declares the deflated transfer syntax. A file meta that cannot be read
    gives False: pydicom's own parse then rejects the file with its reason."""
    try:
        with open(path, "rb") as fp:
            read_preamble(fp, force=True)
            return _read_file_meta_info(fp).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:
        return False


def read_deflated(path: Path, limits: Limits) -> tuple[FileDataset, int]:
    """The data set and the number of inflated bytes it holds."""
    with open(path, "rb") as fp:
        preamble = read_preamble(fp, force=True)
        file_meta = _read_file_meta_info(fp)
        compressed = os.fstat(fp.fileno()).st_size - fp.tell()
        with decoding("inflating the deflated data set"):
            inflated = _inflate(fp, compressed, limits)
    dataset = read_dataset(DicomBytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    ds = FileDataset(str(path), dataset, preamble, file_meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset.original_character_set)
    return ds, len(inflated)


def _inflate(fp, compressed: int, limits: Limits) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, no zlib header (PS3.5 A.5)
    chunks: list[bytes] = []
    size, cap, frame_cost, next_look = 0, NON_PIXEL_ALLOWANCE, 0, _FIRST_LOOK
    header_known = False
    while not inflater.eof:
        data = fp.read(_BLOCK)
        if not data:
            raise Rejected("truncated", "the file ends before its deflate stream does")
        while data and not inflater.eof:
            chunk = inflater.decompress(data, _STEP)
            data = inflater.unconsumed_tail
            chunks.append(chunk)
            size += len(chunk)
            if not header_known and size >= next_look:
                module = _image_module(b"".join(chunks))
                next_look = 2 * size
                if module is not None:
                    header_known = True
                    cap, frame_cost = _bounds(module, size, compressed, limits)
            if size > cap:
                where = "more than its header declares" if header_known else "before reaching an image pixel module"
                raise Rejected("too_large", f"the deflated data set inflates beyond {amount(cap)}, {where}")
            # While pydicom parses the inflated bytes they are held twice (buffer and element values).
            check_memory(2 * size + frame_cost, limits, "the deflated data set")
    return b"".join(chunks)


def _image_module(prefix: bytes) -> Dataset | None:
    """The top-level elements up to group 0028, once ``prefix`` reaches past them (else None)."""
    reached = []

    def past_group_0028(tag, vr, length) -> bool:
        if tag.group > 0x0028:
            reached.append(tag)
            return True
        return False

    try:
        with warnings.catch_warnings():  # the prefix ends mid-element: pydicom warns, the next look sees more
            warnings.simplefilter("ignore")
            ds = read_dataset(DicomBytesIO(prefix), is_implicit_VR=False, is_little_endian=True,
                              stop_when=past_group_0028)
    except Exception:  # an element cut by the end of the prefix: look again once more is inflated
        return None
    return ds if reached else None


def _bounds(module: Dataset, inflated: int, compressed: int, limits: Limits) -> tuple[int, int]:
    """(most inflated bytes the data set may reach, bytes one decoded frame costs), from the image pixel
    module; the pixel data the header declares is checked against the limits and the memory budget."""
    if not has_image_module(module):
        return NON_PIXEL_ALLOWANCE, 0  # no image: only other elements may follow
    header = PixelHeader.of(module)
    header.check_size(limits)
    pixel_bytes = header.native_bytes()
    check_deflate_ratio(pixel_bytes, compressed, "the deflated data set")
    frame_cost = header.frame_values() * FRAME_BYTES_PER_VALUE
    check_memory(2 * (inflated + pixel_bytes) + frame_cost, limits, "the deflated data set")
    return pixel_bytes + NON_PIXEL_ALLOWANCE + PER_FRAME_ALLOWANCE * header.frames, frame_cost
