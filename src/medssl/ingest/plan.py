"""Plan an ingest: list every input file, hash it, mark exact duplicates, cut the list into work units.

The plan is saved (atomically) before any image is processed. A rerun of the same command loads it,
so resuming never rescans or rehashes, and each work unit always covers the same files: that is
what makes a resumed run produce exactly the samples of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medssl.atomic import atomic_write_text
from medssl.config import ConfigError, IngestConfig, dump_config

PLAN_VERSION = 1
# Settings that change what a work unit writes; a resumed run must use the same ones.
PROCESSING_KEYS = ("inputs", "files_per_chunk", "samples_per_shard", "max_side", "planes", "slice_stride",
                   "max_pixels", "max_frame_side", "max_memory_mb", "percentiles", "nifti_modality", "raster_modality", "redact_paths")


@dataclass
class PlannedFile:
    root: int             # index into the input roots
    rel: str              # path relative to its root ("" when the root is the file itself)
    size: int
    sha256: str | None    # None when the file could not be read during the scan
    error: str | None     # scan-time rejection ("code: detail")
    duplicate_of: int | None = None  # plan index of the first file with the same content


@dataclass
class Plan:
    roots: list[str]
    settings: dict
    files: list[PlannedFile]
    files_per_chunk: int

    def path(self, i: int) -> str:
        f = self.files[i]
        return os.path.join(self.roots[f.root], f.rel) if f.rel else self.roots[f.root]

    def chunks(self) -> list[list[int]]:
        n, k = len(self.files), self.files_per_chunk
        return [list(range(start, min(start + k, n))) for start in range(0, n, k)]

    def save(self, path: Path) -> None:
        body = {"version": PLAN_VERSION, "roots": self.roots, "settings": self.settings,
                "files_per_chunk": self.files_per_chunk,
                "files": [[f.root, f.rel, f.size, f.sha256, f.error, f.duplicate_of] for f in self.files]}
        atomic_write_text(path, json.dumps(body))

    @classmethod
    def load(cls, path: Path) -> Plan:
        body = json.loads(Path(path).read_text())
        if body.get("version") != PLAN_VERSION:
            raise ConfigError(f"{path} was written by an incompatible medssl version; ingest into a new --out")
        return cls(body["roots"], body["settings"], [PlannedFile(*row) for row in body["files"]],
                   body["files_per_chunk"])


def processing_settings(cfg: IngestConfig) -> dict:
    full = dump_config(cfg)
    full["inputs"] = [str(Path(p).resolve()) for p in cfg.inputs]
    return {k: full[k] for k in PROCESSING_KEYS}


# What a scan says about an entry that is not a regular file (never opened: a FIFO would block forever).
_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind_error(mode: int) -> str | None:
    for test, what in _SPECIAL:
        if test(mode):
            return f"not_a_regular_file: {what}; not opened"
    return None if stat.S_ISREG(mode) else "not_a_regular_file: neither a file nor a folder; not opened"


def scan(inputs: list[Path], exclude: Path) -> list[tuple[int, str, str | None]]:
    """Every entry under the inputs as (root index, relative path, scan error), in a deterministic order.

    Only regular files are meant to be opened later; anything else gets an error here, from ``stat``
    alone: FIFOs, devices and sockets (``not_a_regular_file``), folders that cannot be listed
    (``unreadable_folder``), broken links and entries that cannot be inspected (``unreadable_file``).
    Symbolic links are followed, to files and to folders; each folder (device and inode) is walked
    once, so a link back to an ancestor or a second link to the same folder gets a row
    (``duplicate_folder``) instead of an endless or repeated walk. The output folder is skipped.
    """
    exclude = exclude.resolve()
    found: list[tuple[int, str, str | None]] = []
    walked: set[tuple[int, int]] = set()
    for r, root in enumerate(inputs):
        root = Path(root)
        try:
            info = root.stat()
        except OSError as e:
            what = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
            raise ConfigError(f"input {root} {what}") from None
        if stat.S_ISDIR(info.st_mode):
            _walk(r, str(root), "", info, exclude, walked, found)
        else:
            found.append((r, "", _kind_error(info.st_mode)))
    return found


def _walk(r: int, root: str, rel: str, info: os.stat_result, exclude: Path,
          walked: set[tuple[int, int]], found: list) -> None:
    """Depth-first over one folder, entries in sorted (byte) order; iterative so depth has no limit.

    Folders reached through a symbolic link are walked after all others, so a folder that is also
    reachable directly is listed under its own path and the link gets the ``duplicate_folder`` row.
    """
    stack, links = [(rel, info)], []
    while stack or links:
        rel, info = stack.pop() if stack else links.pop(0)
        here = os.path.join(root, rel) if rel else root
        identity = (info.st_dev, info.st_ino)
        if identity in walked:
            found.append((r, rel, "duplicate_folder: a link to a folder listed elsewhere in the inputs; "
                                  "its files are listed there once"))
            continue
        walked.add(identity)
        try:
            with os.scandir(here) as entries:
                names = sorted((e.name for e in entries), key=os.fsencode)
        except OSError as e:
            found.append((r, rel, f"unreadable_folder: cannot list the folder ({e.strerror}); its files are not ingested"))
            continue
        folders = []
        for name in names:
            child = os.path.join(rel, name) if rel else name
            path = os.path.join(here, name)
            try:
                child_info = os.stat(path)  # follows symbolic links
            except OSError as e:
                why = "a broken symbolic link" if os.path.islink(path) else f"cannot inspect the entry ({e.strerror})"
                found.append((r, child, f"unreadable_file: {why}"))
                continue
            if not stat.S_ISDIR(child_info.st_mode):
                found.append((r, child, _kind_error(child_info.st_mode)))
            elif Path(path).resolve() != exclude:
                (links if os.path.islink(path) else folders).append((child, child_info))
        stack.extend(reversed(folders))


def hash_file(path: str) -> tuple[int, str | None, str | None]:
    """(size, sha256, error). Reads in 1 MiB blocks so large files cost no memory.

    Opened non-blocking and checked to be a regular file first, so an entry replaced by a FIFO
    after the scan cannot block the run.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return 0, None, f"unreadable_file: cannot open the file ({e.strerror})"
    with os.fdopen(fd, "rb") as f:
        kind = _kind_error(os.fstat(fd).st_mode)
        if kind:
            return 0, None, kind
        h = hashlib.sha256()
        size = 0
        try:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
        except OSError as e:
            return 0, None, f"unreadable_file: cannot read the file ({e.strerror})"
    if size == 0:
        return 0, None, "empty_file: zero-byte file"
    return size, h.hexdigest(), None


def build_plan(cfg: IngestConfig, run: Callable[[Callable, Iterable], Iterator], progress) -> Plan:
    """Scan and hash the inputs (hashing runs on the engine, in batches) and mark duplicates."""
    roots = [str(Path(p).resolve()) for p in cfg.inputs]
    listed = scan([Path(r) for r in roots], Path(cfg.out))
    # Entries the scan already rejected are not opened; the rest are hashed on the engine.
    paths = [None if error else os.path.join(roots[r], rel) if rel else roots[r] for r, rel, error in listed]
    batch = 256
    batches = [(i, paths[i:i + batch]) for i in range(0, len(paths), batch)]
    hashes: list = [(0, None, error) for _, _, error in listed]
    for start, result in run(_hash_batch_at, batches):
        for j, hashed in enumerate(result):
            if hashed is not None:
                hashes[start + j] = hashed
        progress(len(result))
    files, first_seen = [], {}
    for i, ((r, rel, _), (size, sha, error)) in enumerate(zip(listed, hashes)):
        dup = first_seen.setdefault(sha, i) if sha else i
        files.append(PlannedFile(r, rel, size, sha, error, dup if dup != i else None))
    return Plan(roots, processing_settings(cfg), files, cfg.files_per_chunk)


def _hash_batch_at(item: tuple[int, list[str]]) -> tuple[int, list]:
    start, paths = item
    return start, [hash_file(p) if p is not None else None for p in paths]
