"""What every reader does to fail well: each reading stage maps any failure to a specific rejection, and
the memory a file will cost is checked from its header before anything is decoded.

Reasons are worded from our own templates, numbers and exception type names only: library messages
can quote header values (names, UIDs), so their text never reaches a reason (it may only steer the
choice between ``truncated`` and ``decode_failed``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from medssl.io.source import Limits, Rejected

# Deflate cannot expand data more than ~1032:1 (a 258-byte match coded in 2 bits), so a stream that
# declares more than this many raw bytes per compressed byte is truncated or corrupt.
DEFLATE_MAX_RATIO = 1100

# Exceptions that stop the process on purpose (or close a generator): never turned into a rejection.
_PASS = (Rejected, KeyboardInterrupt, SystemExit, GeneratorExit)

# Phrases of decoder messages that mean the data ends early (pydicom, Pillow, tifffile, nibabel, zlib).
_SHORT_DATA = re.compile(r"truncated|less than expected|end of (file|data|stream)|premature end|incomplete"
                         r"|failed to read \d+ bytes|cannot be reshaped|buffer is smaller", re.IGNORECASE)


def _type_name(exc: BaseException) -> str:
    """The exception's type, with its module where the bare name says little (``zlib.error``)."""
    kind = type(exc)
    return kind.__name__ if kind.__module__ == "builtins" or kind.__name__[0].isupper() else \
        f"{kind.__module__}.{kind.__name__}"


def failure(exc: BaseException, code: str, what: str) -> Rejected:
    """The rejection for ``exc`` raised while ``what`` (a phrase such as "parsing the header")."""
    if isinstance(exc, MemoryError) or code == "too_large":
        return Rejected("too_large", f"out of memory while {what} (the memory budget is max_memory_mb)")
    if not isinstance(exc, Exception):  # a native library panicked (pyo3's PanicException is a BaseException)
        return Rejected("decoder_crash", f"the decoder crashed while {what} ({_type_name(exc)})")
    return Rejected(code, f"failed while {what} ({_type_name(exc)})")


# Phrases of native decoders whose allocation failed (libjpeg: "Out of free memory"): in a decode worker
# that is the memory budget's cap, the same event as a MemoryError.
_NO_MEMORY = re.compile(r"out of (free )?memory|insufficient memory|cannot allocate|memory allocation failed",
                        re.IGNORECASE)


def _decode_code(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return "unsupported_encoding"
    if _NO_MEMORY.search(str(exc)):
        return "too_large"
    if isinstance(exc, EOFError) or _SHORT_DATA.search(str(exc)):
        return "truncated"
    return "decode_failed"


@contextmanager
def stage(code: str, what: str) -> Iterator[None]:
    """Run one reading stage (header parsing, a check): a rejection passes through, any other failure
    becomes ``code`` (``too_large`` for MemoryError, ``decoder_crash`` for a native panic)."""
    try:
        yield
    except _PASS:
        raise
    except BaseException as e:  # native panics derive from BaseException only
        raise failure(e, code, what) from None


@contextmanager
def decoding(what: str) -> Iterator[None]:
    """Run a pixel-decoding stage: failures become ``truncated`` when the data ends early, else
    ``decode_failed`` (``unsupported_encoding`` for a missing decoder, ``decoder_crash`` for a panic)."""
    try:
        yield
    except _PASS:
        raise
    except BaseException as e:
        raise failure(e, _decode_code(e), what) from None


def amount(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MB" if n_bytes >= 2**20 else f"{int(n_bytes):,} bytes"


def check_memory(needed: int, limits: Limits, what: str) -> None:
    """Reject ``too_large`` when decoding is estimated to hold more than the memory budget at once."""
    if needed > limits.max_memory_bytes:
        raise Rejected("too_large", f"{what} needs about {amount(needed)} to decode, over the memory budget of "
                                    f"{amount(limits.max_memory_bytes)} (setting max_memory_mb)")


def check_deflate_ratio(raw_bytes: int, compressed_bytes: int, what: str) -> None:
    """Reject ``truncated`` when ``raw_bytes`` cannot come out of ``compressed_bytes`` of deflate."""
    if raw_bytes > DEFLATE_MAX_RATIO * max(compressed_bytes, 1):
        raise Rejected("truncated", f"{what} declares {amount(raw_bytes)} of raw data in {amount(compressed_bytes)}, "
                                    f"more than deflate can expand: the data is truncated or corrupt")
