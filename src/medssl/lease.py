"""One writer at a time: a lease on a dataset folder, taken before a run writes into it.

Two ingests into one dataset would delete each other's temporary files and redo each other's units. So a
run takes the folder's lease first and a second writer is refused with one line naming the holder.

- Local folder: an exclusive ``flock`` on ``NAME.lock``. The kernel lets go when the holder's process
  ends, however it ends, so a lease whose holder died is simply free again. The file holds who took it,
  for the refusal message; it is left in place (deleting a locked file would let two writers each lock a
  different inode).
- Object storage (``s3://``): the object ``NAME.lease``, created with a conditional write
  (``If-None-Match: *``: only one create succeeds) and renewed by a background thread every
  ``ttl_s / 4``. A lease not renewed for ``ttl_s`` (measured on the store's clock: its ``Date`` against the
  object's ``LastModified``) belongs to a holder that died; the next writer takes it over with a write
  conditional on the stale version (``If-Match``), so of two writers taking over at once only one wins.
  A holder that finds its lease taken (it stalled longer than ``ttl_s``) is told so by ``check``. A lease
  left by a process of this machine that is gone (a run ended by an outage cannot delete it) is stale at
  once.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path

from medssl import storage
from medssl.config import ConfigError

log = logging.getLogger("medssl.lease")


class LeaseHeld(ConfigError):
    """Another run holds the lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another writer (this run stalled for longer than the lease)."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _dead_here(holder: dict) -> bool:
    """A holder on this machine whose process is gone (a run that ended in an outage could not delete its
    lease): its lease need not wait for ``ttl_s``."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _shown(holder: dict) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"


class Lease:
    def __init__(self, folder: str | Path, name: str, ttl_s: float):
        self.folder, self.name, self.ttl_s = folder, name, ttl_s
        self.lost = False

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"another writer took over the lease of {self.folder} while this run stalled for more "
                            f"than {self.ttl_s:g} s; stopping before writing more (rerun the same command to resume)")


@contextlib.contextmanager
def lease(folder: str | Path, name: str = "ingest", ttl_s: float = 120.0) -> Iterator[Lease]:
    """Hold the lease of ``folder`` for the block; ``LeaseHeld`` if another live run holds it."""
    if storage.is_url(folder):
        with _object_lease(str(folder), name, ttl_s) as held:
            yield held
    else:
        with _file_lease(Path(folder), name, ttl_s) as held:
            yield held


@contextlib.contextmanager
def _file_lease(folder: Path, name: str, ttl_s: float) -> Iterator[Lease]:
    path = folder / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            try:
                holder = _shown(json.loads(os.pread(fd, 4096, 0) or b"{}"))
            except ValueError:
                holder = "a process that has not written its name yet"
            raise LeaseHeld(f"{folder} is being written by another {name} ({holder}): wait for it to end or "
                            "stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield Lease(folder, name, ttl_s)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _object_lease(folder: str, name: str, ttl_s: float) -> Iterator[Lease]:
    url = storage.join(folder, f"{name}.lease")
    fs, path = storage.filesystem(url)
    if not hasattr(fs, "call_s3"):  # conditional writes are an S3 API
        log.warning("%s: no lease on this kind of object store; do not run two writers at once", folder)
        yield Lease(folder, name, ttl_s)
        return
    bucket, key = path.split("/", 1)
    token = uuid.uuid4().hex
    body = json.dumps({**_holder(), "token": token, "ttl_s": ttl_s}).encode()
    etag = _take(fs, bucket, key, body, token, folder, name, ttl_s)
    held = Lease(folder, name, ttl_s)
    stop = threading.Event()

    def renew() -> None:
        nonlocal etag
        while not stop.wait(ttl_s / 4):
            try:
                etag = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]
            except FileExistsError:  # the precondition failed: someone took the lease over
                held.lost = True
                return
            except Exception as e:  # noqa: BLE001 - a store that is briefly unreachable: try again next time
                log.warning("%s: could not renew the lease (%s); trying again", folder, type(e).__name__)

    thread = threading.Thread(target=renew, name="medssl-lease", daemon=True)
    thread.start()
    try:
        yield held
    finally:
        stop.set()
        thread.join()
        if not held.lost:
            with contextlib.suppress(Exception):  # unreachable now: the lease expires by itself
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)


def _take(fs, bucket: str, key: str, body: bytes, token: str, folder: str, name: str, ttl_s: float) -> str:
    """Create the lease object, or take over a stale one; the ETag of our version."""
    from fsspec.asyn import sync  # fsspec only for URLs (medssl.storage)

    for _ in range(3):  # the lease may change between our reads: look again
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
        except FileExistsError:
            pass
        try:
            got = fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:  # released since: create it again
            continue
        current = json.loads(sync(fs.loop, got["Body"].read))
        if current.get("token") == token:  # our own create, retried by the client after a lost response
            return got["ETag"]
        now = parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (now - got["LastModified"]).total_seconds()
        if age < ttl_s and not _dead_here(current):
            raise LeaseHeld(f"{folder} is being written by another {name} ({_shown(current)}; lease renewed "
                            f"{age:.0f} s ago): wait for it to end or stop it, then rerun")
        try:
            etag = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=got["ETag"])["ETag"]
        except FileExistsError:  # another writer took it over first
            continue
        log.warning("%s: took over the lease of %s, not renewed for %.0f s, whose holder died", folder,
                    _shown(current), age)
        return etag
    raise LeaseHeld(f"{folder}: the lease changed hands while this run tried to take it; another {name} runs now")
