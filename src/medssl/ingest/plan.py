"""Plan an ingest: list every input file, hash it, mark exact duplicates, cut the list into work units.

The plan is saved (atomically) before any image is processed. A rerun of the same command loads it,
so resuming never rescans or rehashes, and each work unit always covers the same files: that is
what makes a resumed run produce exactly the samples of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medssl.atomic import atomic_write_text
from medssl.config import ConfigError, IngestConfig, dump_config

PLAN_VERSION = 1
# Settings that change what a work unit writes; a resumed run must use the same ones.
PROCESSING_KEYS = ("inputs", "files_per_chunk", "samples_per_shard", "max_side", "planes", "slice_stride",
                   "max_pixels", "max_frame_side", "percentiles", "nifti_modality", "raster_modality", "redact_paths")


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


def scan(inputs: list[Path], exclude: Path) -> list[tuple[int, str]]:
    """Every file under the inputs, in a deterministic order, skipping the output folder itself."""
    exclude = exclude.resolve()
    found: list[tuple[int, str]] = []
    for r, root in enumerate(inputs):
        root = Path(root)
        if not root.exists():
            raise ConfigError(f"input {root} does not exist")
        if root.is_file():
            found.append((r, ""))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath).resolve()
            dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() != exclude)
            for name in sorted(filenames):
                found.append((r, os.path.relpath(os.path.join(dirpath, name), root)))
    return found


def hash_file(path: str) -> tuple[int, str | None, str | None]:
    """(size, sha256, error). Reads in 1 MiB blocks so large files cost no memory."""
    try:
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
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
    paths = [os.path.join(roots[r], rel) if rel else roots[r] for r, rel in listed]
    batch = 256
    batches = [(i, paths[i:i + batch]) for i in range(0, len(paths), batch)]
    hashes: list = [None] * len(paths)
    for start, result in run(_hash_batch_at, batches):
        hashes[start:start + len(result)] = result
        progress(len(result))
    files, first_seen = [], {}
    for i, ((r, rel), (size, sha, error)) in enumerate(zip(listed, hashes)):
        dup = first_seen.setdefault(sha, i) if sha else i
        files.append(PlannedFile(r, rel, size, sha, error, dup if dup != i else None))
    return Plan(roots, processing_settings(cfg), files, cfg.files_per_chunk)


def _hash_batch_at(item: tuple[int, list[str]]) -> tuple[int, list]:
    start, paths = item
    return start, [hash_file(p) for p in paths]
