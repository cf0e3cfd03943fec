"""Where medssl reads and writes: a local path, or an object-storage URL such as ``s3://bucket/prefix``.

A location is a ``Path`` (local) or a ``str`` holding a URL: pathlib would fold the ``//`` of a URL, so
URLs never become ``Path`` objects (``location`` makes the choice). Local paths go straight to the
operating system, as before this module existed: fsspec is imported and used only for URLs.

URLs go through fsspec (``s3://`` through s3fs), so any protocol fsspec knows works. Endpoint and
credentials come from the standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``...), which botocore reads itself: any S3-compatible
store works without flags.

Writing an object atomically is ``medssl.atomic.atomic_open``, which hands URLs to ``upload_atomically``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# Bytes fetched per request when streaming an object, and held per open object. A GET costs some tens
# of milliseconds before its first byte, so 4 MiB requests still move ~50 MB/s per stream, more than a
# DataLoader worker decodes; and a worker reading its shards side by side (ShardStream's interleave,
# 32 by default) holds 32 x 4 MiB, not 32 shards.
READ_BLOCK = 4 * 2**20


def is_url(loc: str | os.PathLike) -> bool:
    return "://" in str(loc)


def location(value: str | os.PathLike) -> str | Path:
    """A URL as a string without a trailing slash, anything else as a ``Path``."""
    return str(value).rstrip("/") if is_url(value) else Path(value)


def join(base: str | Path, *parts: str) -> str | Path:
    """``base / part / ...`` for a local path or a URL."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def filesystem(url: str):
    """The fsspec file system of ``url`` and the path within it. Listings are not cached: another process
    (a resumed run, a worker) may have written since, and medssl lists little."""
    from fsspec.core import url_to_fs

    return url_to_fs(url, use_listings_cache=False)


def open_read(loc: str | Path) -> IO[bytes]:
    """A readable, seekable binary file; for a URL it fetches ``READ_BLOCK`` bytes at a time, never the whole object."""
    if not is_url(loc):
        return open(loc, "rb")
    fs, path = filesystem(loc)
    return fs.open(path, "rb", block_size=READ_BLOCK)


def read_bytes(loc: str | Path) -> bytes:
    """The whole file; an object in a single request, so it is one version even while a writer replaces it
    (reading block by block could mix two)."""
    if not is_url(loc):
        return Path(loc).read_bytes()
    fs, path = filesystem(loc)
    return fs.cat_file(path)


def read_text(loc: str | Path) -> str:
    return read_bytes(loc).decode("utf-8")


def exists(loc: str | Path) -> bool:
    if not is_url(loc):
        return Path(loc).exists()
    fs, path = filesystem(loc)
    return fs.exists(path)


def listdir(loc: str | Path) -> list[str]:
    """Names of the entries directly under ``loc`` (files and folders), sorted; [] if there is none."""
    if not is_url(loc):
        return sorted(p.name for p in Path(loc).iterdir()) if Path(loc).is_dir() else []
    fs, path = filesystem(loc)
    if not fs.isdir(path):
        return []
    return sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(path, detail=False))


def size(loc: str | Path) -> int:
    if not is_url(loc):
        return Path(loc).stat().st_size
    fs, path = filesystem(loc)
    return fs.size(path)


def remove(loc: str | Path) -> None:
    """Delete a file or object; nothing happens if it is not there."""
    if not is_url(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    if fs.exists(path):
        fs.rm_file(path)


def makedirs(loc: str | Path) -> None:
    """Create a local folder; object stores have no folders (a key's prefix needs no creating)."""
    if not is_url(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def upload_atomically(url: str, mode: str = "wb") -> Iterator[IO]:
    """A file to write the whole object into; uploaded when the block ends without an error.

    The bytes go to a local temporary file first (``TMPDIR``), then one upload. An object store
    publishes an object whole when its upload completes (a multipart upload too, on completion), so
    readers see the old object or the new one, never part of one; a failed block uploads nothing.
    """
    fs, path = filesystem(url)
    with tempfile.NamedTemporaryFile(mode, suffix=".upload", **({} if "b" in mode else {"encoding": "utf-8"})) as tmp:
        yield tmp
        tmp.flush()
        fs.put_file(tmp.name, path)
