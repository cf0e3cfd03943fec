"""The image size a JPEG, JPEG-LS or JPEG 2000 codestream declares, read from its first bytes.

Decoders allocate from the codestream's own header, not from the DICOM header around it: a 250-byte
JPEG 2000 frame can ask openjpeg for gigabytes. Reading the declared size first lets the DICOM reader
refuse a frame whose codestream claims more than its DICOM header does, before any allocation.
"""

from __future__ import annotations

import struct

_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # start of codestream + image and tile size marker
# Start-of-frame markers: JPEG SOF0-SOF15 (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 (F7).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI, EOI: markers without a length field
_SOS = 0xDA
_LOOK = 1 << 16  # the size sits in the first few hundred bytes; a JP2 header box may precede it
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "  # the first box of a JP2 file (ISO/IEC 15444-1 I.5.1)


def declared_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG-family or JPEG 2000 codestream; None when no size is found."""
    if frame[:2] == _JPEG_SOI:
        return _jpeg_size(frame)
    at = frame.find(_J2K_SOC_SIZ, 0, _LOOK)
    if at >= 0 and len(frame) >= at + 42:
        # SIZ: Lsiz Rsiz (2 bytes each), Xsiz Ysiz XOsiz YOsiz (4 each), the tile grid (16), Csiz (2)
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", frame[at + 8: at + 24])
        (components,) = struct.unpack(">H", frame[at + 40: at + 42])
        return max(ysiz - yosiz, 0), max(xsiz - xosiz, 0), components
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    pos, end = 2, min(len(frame), _LOOK)
    while pos + 4 <= end:
        if frame[pos] != 0xFF:
            return None  # not at a marker: a corrupt stream, left to the decoder
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if marker in _SOF and pos + 10 <= len(frame):
            rows, columns = struct.unpack(">HH", frame[pos + 5: pos + 9])
            return rows, columns, frame[pos + 9]
        if marker == _SOS:
            return None
        (length,) = struct.unpack(">H", frame[pos + 2: pos + 4])
        pos += 2 + length
    return None


def jp2_box_error(frame: bytes) -> str | None:
    """What is wrong with the box chain of a JP2-wrapped codestream, or None (also for a bare codestream).

    pydicom walks the boxes to find the codestream and adds each box's length to its position: a box of
    length 0 (legal only for the last box) keeps it in place forever. So the chain is checked first, with
    the standard's rules: length 0 = to the end of the file, 1 = a 64-bit length follows, else at least 8."""
    if not frame.startswith(_JP2_SIGNATURE):
        return None
    at = 12  # after the signature box (always 12 bytes)
    while at + 8 <= len(frame):
        (length,), kind = struct.unpack(">I", frame[at:at + 4]), frame[at + 4:at + 8]
        if kind == b"jp2c":
            return None
        shown = kind.decode("latin-1").encode("unicode_escape").decode()
        if length == 1:
            if at + 16 > len(frame):
                return f"the JP2 box '{shown}' is cut short"
            (length,) = struct.unpack(">Q", frame[at + 8:at + 16])
            if length < 16:
                return f"the JP2 box '{shown}' declares a length of {length} bytes, less than its own header"
        elif length == 0:
            return f"the JP2 box '{shown}' has length 0 (to the end of the file) but is not the codestream box"
        elif length < 8:
            return f"the JP2 box '{shown}' declares a length of {length} bytes, less than its own header"
        at += length
    return "the JP2 file holds no codestream box (jp2c)"
