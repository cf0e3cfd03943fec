"""A work unit: process a fixed, planned list of entries and write their shards and manifest rows.

Each file is hashed and then decoded by the decode worker, from one read of storage (the decode finds
the bytes in the page cache). A file with the same content as an earlier one of the same unit is a
duplicate and is not decoded; duplicates across units are resolved when the generation is finished
(``dedup.py``). The unit's manifest part (``manifest/chunk-NNNNNN.jsonl``) is written last and
atomically: it is the unit's completion mark. A unit without it is redone from scratch on resume (its
shards are rewritten with identical content, since keys and pixels depend only on the files and
settings).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl import storage
from medssl.atomic import atomic_write_text
from medssl.config import IngestConfig
from medssl.ingest.pipeline import FileOutcome, FileTask, process_file_isolated
from medssl.io.isolation import Budget, IsolatedWorker, shared_worker
from medssl.privacy import keyed_hash
from medssl.shard_format import Sample, write_shard


@dataclass(frozen=True)
class ChunkJob:
    chunk: int
    files: list[tuple[int, str, str, str | None]]  # (entry index, path, manifest path, scan error)
    cfg: IngestConfig
    out: str
    salt: bytes
    seen_db: str            # this machine's SeenContent table (dedup.py)
    content_db: str | None  # the dataset's content.sqlite when this machine has it (earlier ingest runs)


@dataclass
class ChunkSummary:
    chunk: int
    files: int
    samples: int
    seconds: float
    bytes_read: int = 0           # input bytes read (hashed) by this unit
    worker_faults: int = 0        # files that cost their decode worker (timeout, crash, memory)
    worker_peak_rss_bytes: int = 0
    worker_cpu_seconds: float = 0.0  # the decode worker's CPU time for this unit (not in this process's)
    worker_storage_read_bytes: int = 0  # what the decode worker read from storage (not the page cache)
    unfinished: str | None = None  # why the unit stopped early (the store failed transiently): redone next run


_SHUFFLE = 2  # first word of the unit's shuffle seed (a purpose of its own; see data/stream.py)


def part_path(out: str | Path, chunk: int) -> str | Path:
    """A unit's manifest rows; all parts together are the dataset's manifest."""
    return storage.join(out, "manifest", f"chunk-{chunk:06d}.jsonl")


def shard_name(chunk: int, part: int) -> str:
    return f"shard-{chunk:06d}-{part:03d}.tar"


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown_path(rel_path: str) -> str:
    """A file name as people read it in manifest, report and logs: printable UTF-8 on one line.

    Names are bytes on POSIX; Python holds undecodable bytes as surrogates, which no UTF-8 file can
    store. Each such byte is written ``\\xNN``, a newline, tab or return ``\\n``, ``\\t``, ``\\r``,
    any other unprintable character ``\\uNNNN`` (``\\UNNNNNNNN`` beyond 16 bits), and a backslash
    ``\\\\``, so the original name can always be recovered from what is shown.
    """
    if rel_path.isprintable() and "\\" not in rel_path:
        return rel_path
    out = []
    for ch in rel_path:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable():
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def manifest_path(rel_path: str, cfg: IngestConfig, salt: bytes) -> str:
    """The path as written in manifest, report and logs: shown as given, or a salted hash with --redact-paths."""
    return f"redacted-{keyed_hash(rel_path, salt)}" if cfg.redact_paths else shown_path(rel_path)


def decode_worker(cfg: IngestConfig) -> IsolatedWorker:
    """This process's decode worker for ``cfg``'s budgets (kept across work units)."""
    return shared_worker(Budget(cfg.file_timeout_s, cfg.max_memory_mb << 20), "medssl.ingest.pipeline")


def prestart_decode_worker(cfg: IngestConfig) -> None:
    """Start the decode worker early, so its start-up overlaps the listing."""
    decode_worker(cfg).start()


class SampleSpool:
    """A unit's encoded samples on local disk, cut into shards in a shuffled order once the unit is done.

    Why: the slices of one file (a volume, a multi-frame DICOM) come out together, and a shard written in
    that order holds runs of one series, which a streaming reader cannot break up (docs/ARCHITECTURE.md,
    "Mixing"). Shuffling the unit's samples (seeded by the unit, so a redone unit writes the same shards)
    puts every shard's neighbours in different files. Memory: a few numbers per sample; the bytes stay
    in the spool file.
    """

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="medssl-spool-")
        self._where: list[tuple[str, int, int, int]] = []  # (key, offset, pixel bytes, metadata bytes)

    def __len__(self) -> int:
        return len(self._where)

    def add(self, sample: Sample) -> None:
        meta = json.dumps(sample.meta).encode()
        self._where.append((sample.key, self._file.tell(), len(sample.pixels), len(meta)))
        self._file.write(sample.pixels)
        self._file.write(meta)

    def _read(self, i: int) -> Sample:
        key, offset, n_pixels, n_meta = self._where[i]
        self._file.seek(offset)
        data = self._file.read(n_pixels + n_meta)
        return Sample(key, data[:n_pixels], json.loads(data[n_pixels:]))

    def write_shards(self, chunk: int, per_shard: int, shard_dir) -> dict[str, str]:
        """Write the spooled samples in a shuffled order, ``per_shard`` at most per shard (sizes even);
        returns each key's shard name."""
        order = np.random.default_rng([_SHUFFLE, chunk]).permutation(len(self._where))
        n_shards = -(-len(order) // per_shard)
        shard_of = {}
        for part, picked in enumerate(np.array_split(order, n_shards) if n_shards else []):
            name = shard_name(chunk, part)
            write_shard(storage.join(shard_dir, name), (self._read(int(i)) for i in picked))
            shard_of.update((self._where[int(i)][0], name) for i in picked)
        return shard_of

    def close(self) -> None:
        self._file.close()


def run_chunk(job: ChunkJob) -> ChunkSummary:
    start = time.perf_counter()
    shard_dir = storage.join(storage.location(job.out), "shards")
    storage.makedirs(shard_dir)
    for name in storage.listdir(shard_dir):  # from a killed attempt at this unit
        if name.startswith(f"shard-{job.chunk:06d}-"):
            storage.remove(storage.join(shard_dir, name))
    worker = decode_worker(job.cfg)
    worker.follow_environment()
    faults_before, cpu_before, read_before = worker.faults, worker.cpu_seconds, worker.storage_read_bytes
    rows: list[dict] = []
    spool = SampleSpool()
    bytes_read = 0
    in_unit: set[str] = set()  # contents this unit holds: two copies must never share a unit's shards
    for index, path, shown, scan_error in job.files:
        row = {"index": index, "path": shown, "sha256": None}
        if scan_error:  # a second link to a folder listed once is a duplicate, anything else a rejection
            row.update(status="duplicate" if scan_error.startswith("duplicate_folder") else "rejected",
                       reason=scan_error)
            rows.append(row)
            continue
        # One call: the worker hashes the file, skips it if a lower index holds its content (the reason
        # then names that file once the generation is finished, dedup.resolve_unit), else decodes it.
        outcome = process_file_isolated(worker, FileTask(index, path, None), job.cfg, job.salt,
                                        (job.seen_db, job.content_db))
        if outcome.status == "unfinished":  # the store is failing: the unit stops and is redone by the next run
            spool.close()
            return ChunkSummary(job.chunk, 0, 0, time.perf_counter() - start, bytes_read,
                                worker.faults - faults_before, worker.peak_rss_bytes, worker.cpu_seconds - cpu_before,
                                worker.storage_read_bytes - read_before, unfinished=outcome.reason)
        bytes_read += outcome.size
        if outcome.sha256 is not None:  # None: not hashed (unreadable, empty): nothing to compare
            if outcome.sha256 in in_unit and outcome.status != "duplicate":  # the worker's cache could not tell
                outcome = FileOutcome("duplicate", reason="duplicate: same content as an earlier file",
                                      sha256=outcome.sha256)
            in_unit.add(outcome.sha256)
        row.update(sha256=outcome.sha256, status=outcome.status, reason=outcome.reason)
        if outcome.status != "duplicate":
            row.update(format=outcome.format, modality=outcome.modality)
        if outcome.samples:  # spooled only once the whole file succeeded: no orphan samples
            row.update(samples=[s.key for s in outcome.samples], empty_frames=outcome.empty_frames)
            for sample in outcome.samples:
                spool.add(sample)
        rows.append(row)
    shard_of = spool.write_shards(job.chunk, job.cfg.samples_per_shard, shard_dir)
    for row in rows:
        if row.get("samples"):
            row["shards"] = [shard_of[key] for key in row["samples"]]
    n_samples = len(spool)
    spool.close()
    atomic_write_text(part_path(storage.location(job.out), job.chunk), "".join(json.dumps(r) + "\n" for r in rows))
    return ChunkSummary(job.chunk, len(job.files), n_samples, time.perf_counter() - start, bytes_read,
                        worker.faults - faults_before, worker.peak_rss_bytes, worker.cpu_seconds - cpu_before,
                        worker.storage_read_bytes - read_before)
