"""Detect a file's format from its bytes, never from its name (PACS exports often have no extensions)."""

from __future__ import annotations

import gzip
import stat
import struct
import zlib
from pathlib import Path

# Groups that can open a DICOM data set written without the 128-byte preamble and "DICM" marker:
# file meta (0002) or the usual first groups of the data set itself (0008 identifying, 0018, 0020, 0028).
_NO_PREAMBLE_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
        b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
        b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A data set without preamble: the first element has a plausible group and a VR or a small length."""
    if len(head) < 8:
        return False
    for endian in "<>":
        group, elem = struct.unpack(endian + "HH", head[:4])
        if group not in _NO_PREAMBLE_GROUPS or elem > 0x0100:
            continue
        if head[4:6] in _VRS:  # explicit VR
            return True
        (length,) = struct.unpack(endian + "I", head[4:8])  # implicit VR: a 32-bit length
        if length < 1024:
            return True
    return False


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348:
        for endian in "<>":
            (size,) = struct.unpack(endian + "i", head[:4])
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return True
            if size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return True
    return False


# What a scan says about an entry that is not a regular file (never opened: a FIFO would block forever).
_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_error(mode: int) -> str | None:
    """The scan error for an entry of this ``st_mode`` that is not a regular file, else None."""
    for test, what in _SPECIAL:
        if test(mode):
            return f"not_a_regular_file: {what}; not opened"
    return None if stat.S_ISREG(mode) else "not_a_regular_file: neither a file nor a folder; not opened"


def detect_format(path: Path) -> str | None:
    """Return dicom | nifti | png | jpeg | tiff, or None for anything else."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if _is_nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(1024)
        except (OSError, EOFError, zlib.error):  # a corrupt gzip stream: nothing tells what it holds
            return None
        return "nifti" if _is_nifti_header(inner) else None
    if _looks_like_bare_dicom(head):
        return "dicom"
    return None
