"""Where medssl reads and writes: a local path, or an object-storage URL such as ``s3://bucket/prefix``.

A location is a ``Path`` (local) or a ``str`` holding a URL: pathlib would fold the ``//`` of a URL, so
URLs never become ``Path`` objects (``location`` makes the choice). Local paths go straight to the
operating system, as before this module existed: fsspec is imported and used only for URLs.

URLs go through fsspec (``s3://`` through s3fs), so any protocol fsspec knows works. Endpoint and
credentials come from the standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``...), which botocore reads itself: any S3-compatible
store works without flags.

Writing an object atomically is ``medssl.atomic.atomic_open``, which hands URLs to ``upload_atomically``.

Transient faults of a store (no connection, timeouts, throttling, 5xx) are retried with exponential
backoff for ``MEDSSL_STORAGE_RETRY_S`` seconds (default 60) on top of the client's own few retries; one
that outlasts them, or any other failure, is a ``StorageError`` of one line naming the operation and the
object. A store that is down for a minute must not turn good files into rejections or a run into a
traceback.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

# Bytes fetched per request when streaming an object, and held per open object. A GET costs some tens
# of milliseconds before its first byte, so 4 MiB requests still move ~50 MB/s per stream, more than a
# DataLoader worker decodes; and a worker reading its shards side by side (ShardStream's interleave,
# 32 by default) holds 32 x 4 MiB, not 32 shards.
READ_BLOCK = 4 * 2**20


class StorageError(OSError):
    """An object-storage operation that failed: one line naming the operation, the object and the cause."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient  # the store was unreachable or overloaded: the same call may work later

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # across process pools
        return StorageError, (self.args[0], self.transient)


# Error types and codes of a store or network that is briefly unavailable (botocore, aiohttp, S3 codes).
_TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ServerDisconnectedError", "ClientConnectorError", "ClientConnectionError", "ClientOSError",
                    "ClientPayloadError", "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
                    "500", "502", "503", "504"}


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the store was unreachable or overloaded, not that the
    request was wrong: retrying later may succeed."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e.transient
        if isinstance(e, ConnectionError | TimeoutError) or type(e).__name__ in _TRANSIENT_TYPES:
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if response.get("Error", {}).get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429:
                return True
        e = e.__cause__ or e.__context__
    return False


def retry_seconds() -> float:
    return float(os.environ.get("MEDSSL_STORAGE_RETRY_S", "60"))


def retrying(operation: str, url: str, call: Callable[[], T], budget_s: float | None = None) -> T:
    """``call()``, retried with exponential backoff (0.5 s doubling to 8 s) while it fails transiently, for
    at most ``budget_s`` (default ``MEDSSL_STORAGE_RETRY_S``). Raises a ``StorageError`` naming
    ``operation`` and ``url`` when it fails otherwise or for longer."""
    deadline = time.monotonic() + (retry_seconds() if budget_s is None else budget_s)
    delay = 0.5
    while True:
        try:
            return call()
        except (FileNotFoundError, StorageError):
            raise
        except Exception as e:  # noqa: BLE001 - classified below; anything else is re-raised as it is
            transient = is_transient(e)
            if not transient and not isinstance(e, OSError):
                raise
            if not transient or time.monotonic() + delay > deadline:
                cause = str(e).splitlines()[0][:200] if str(e) else ""
                what = f"{type(e).__name__}: {cause}" if cause else type(e).__name__
                retried = " after retrying" if transient else ""
                raise StorageError(f"cannot {operation} {url}{retried}: {what}", transient) from None
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


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
    return retrying("read", str(loc), lambda: fs.cat_file(path))


def read_text(loc: str | Path) -> str:
    return read_bytes(loc).decode("utf-8")


def exists(loc: str | Path) -> bool:
    if not is_url(loc):
        return Path(loc).exists()
    fs, path = filesystem(loc)
    return retrying("look up", str(loc), lambda: fs.exists(path))


def listdir(loc: str | Path) -> list[str]:
    """Names of the entries directly under ``loc`` (files and folders), sorted; [] if there is none."""
    if not is_url(loc):
        return sorted(p.name for p in Path(loc).iterdir()) if Path(loc).is_dir() else []
    fs, path = filesystem(loc)

    def names() -> list[str]:
        try:
            return fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    # A prefix that names one object lists as itself: that is a file, not a folder.
    found = [p for p in retrying("list", str(loc), names) if p.rstrip("/") != path.rstrip("/")]
    return sorted(p.rstrip("/").rpartition("/")[2] for p in found)


def size(loc: str | Path) -> int:
    if not is_url(loc):
        return Path(loc).stat().st_size
    fs, path = filesystem(loc)
    return retrying("read the size of", str(loc), lambda: fs.size(path))


def remove(loc: str | Path) -> None:
    """Delete a file or object; nothing happens if it is not there."""
    if not is_url(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
    retrying("delete", str(loc), rm)


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
        retrying("write", url, lambda: fs.put_file(tmp.name, path))
