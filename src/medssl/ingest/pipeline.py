"""The per-file function: read -> intensity mapping -> 2D frames -> resize -> encoded samples.

It never raises for bad input: every problem becomes a rejection with a specific reason, so one
broken file cannot stop a run over millions. Work units call it through ``process_file_isolated``,
which runs it in a decode worker process (``medssl.io.isolation``): a crash, a hang or a memory
blow-up in a native decoder then costs that one file, not the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medssl.config import IngestConfig
from medssl.ingest.dedup import SeenContent
from medssl.intensity import map_frame
from medssl.io import Limits, Rejected, SourceImage, read_image
from medssl.io.detect import kind_error
from medssl.io.isolation import IsolatedWorker
from medssl.privacy import keyed_hash, scrub
from medssl.shard_format import Sample, encode_pixels, storage_for
from medssl.storage import StorageError, is_url, open_read, retrying

# DICOM objects with pixel data that are not pictures of the patient (labels, dose grids, overlays, ...),
# by modality code and by words of their SOP class's name: pretraining on them teaches nothing about images.
NON_IMAGE_MODALITIES = {"SEG": "a segmentation", "RTDOSE": "a radiotherapy dose grid", "RTSTRUCT": "a structure set",
                        "RTPLAN": "a radiotherapy plan", "RTRECORD": "a treatment record", "PR": "a presentation state",
                        "KO": "a key object selection", "SR": "a structured report", "REG": "a registration",
                        "DOC": "an encapsulated document", "PLAN": "a plan"}
_NON_IMAGE_SOP_WORDS = ("Segmentation", "RT Dose", "RT Structure", "RT Plan", "Presentation State", "Key Object",
                        " SR ", "Registration", "Encapsulated PDF")

# Linkage hashes written into sample metadata: which images share a patient, a study, a series.
_LINKAGE = {"patient": "PatientID", "study": "StudyInstanceUID", "series": "SeriesInstanceUID"}


@dataclass(frozen=True)
class FileTask:
    """One input file as planned: where it is and what the scan already learned about it."""

    index: int
    path: str
    sha256: str | None  # None: the decode worker hashes it first (process_file_isolated)


@dataclass
class FileOutcome:
    status: str                       # ingested | rejected | duplicate | unfinished (the store failed: next run)
    reason: str | None = None         # "code: detail" for rejections
    format: str | None = None
    modality: str | None = None
    samples: list[Sample] = field(default_factory=list)
    empty_frames: int = 0
    sha256: str | None = None         # when the worker hashed the file (FileTask.sha256 was None)
    size: int = 0                     # bytes read to hash it


def hash_file(path: str) -> tuple[int, str | None, str | None]:
    """(size, sha256, error). Reads in 1 MiB blocks so large files cost no memory.

    Opened non-blocking and checked to be a regular file first, so an entry replaced by a FIFO
    after the scan cannot block the run. In an ingest this runs in the decode worker right before the
    file is decoded: a read that hangs costs that file (``timeout``), and decoding finds the bytes in
    the page cache, so storage is read once. An object-storage URL is downloaded once, to a local
    temporary file that the decode then reads (``_fetch``).
    """
    if is_url(path):
        return _fetch(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return 0, None, f"unreadable_file: cannot open the file ({e.strerror})"
    with os.fdopen(fd, "rb") as f:
        kind = kind_error(os.fstat(fd).st_mode)
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


# The decode worker's local copy of the object it works on (URL -> temporary file); one at a time.
_fetched: dict[str, str] = {}


def _fetch(url: str) -> tuple[int, str | None, str | None]:
    """Download an object to a local temporary file, hashing it on the way: the one read from storage.
    Transient store faults are retried (``storage.retrying``); if they outlast the retries the error is
    ``unfinished: ...``: the file is left for the next run, never rejected for a fault of the store."""
    _forget_fetched()
    fd, tmp = tempfile.mkstemp(prefix="medssl-object-")
    os.close(fd)

    def download() -> tuple[int, str]:
        h, size = hashlib.sha256(), 0
        with open(tmp, "wb") as local, open_read(url) as remote:  # from the start on every attempt
            while block := remote.read(1 << 20):
                h.update(block)
                local.write(block)
                size += len(block)
        return size, h.hexdigest()

    try:
        size, digest = retrying("read", url, download)
    except Exception as e:  # noqa: BLE001 - any client error (network, permission, a vanished object) costs the file
        os.unlink(tmp)
        if isinstance(e, StorageError) and e.transient:
            return 0, None, f"unfinished: {e}"
        cause = type(e.__cause__ or e.__context__ or e).__name__ if isinstance(e, StorageError) else type(e).__name__
        return 0, None, f"unreadable_file: cannot read the object ({cause})"
    if size == 0:
        os.unlink(tmp)
        return 0, None, "empty_file: zero-byte file"
    _fetched[url] = tmp
    return size, digest, None


def _forget_fetched() -> None:
    for tmp in _fetched.values():
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fetched.clear()


def resize_longest_side(values: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (antialiased bilinear) so that the longer side is at most ``max_side``; never upscale."""
    h, w = values.shape
    if max(h, w) <= max_side:
        return values
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(values).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _samples(task: FileTask, src: SourceImage, cfg: IngestConfig, salt: bytes) -> tuple[list[Sample], int]:
    linkage = {name: keyed_hash(src.identifiers[kw], salt) for name, kw in _LINKAGE.items() if kw in src.identifiers}
    samples, empty, seen = [], 0, 0
    for frame in src.frames:
        seen += 1
        if not np.isfinite(frame.pixels).all():
            raise Rejected("non_finite", f"frame {frame.index} contains NaN or infinite values")
        mapped = map_frame(src, frame, cfg.percentiles)
        if mapped is None:
            empty += 1
            continue
        values, intensity = mapped
        stored = resize_longest_side(values, cfg.max_side)
        store = storage_for(intensity.semantics, cfg.pixel_format)
        h, w = values.shape
        factor = h / stored.shape[0]
        spacing = list(src.spacing_mm) if src.spacing_mm else None
        key = f"{task.sha256[:20]}-{frame.plane[0]}{frame.index:05d}"
        meta = {
            "key": key,
            "modality": src.modality,
            "intensity": {**intensity.as_dict(), "store": store},
            "source": {"sha256": task.sha256, "format": src.format, "frame": frame.index, "plane": frame.plane,
                       "frames": src.n_frames, "photometric": src.photometric, "bits_stored": src.bits_stored,
                       **src.info},
            "original_size": [h, w],
            "size": list(stored.shape),
            "spacing_mm": spacing,
            "stored_spacing_mm": [s * factor for s in spacing] if spacing else None,
            "linkage": linkage,
        }
        samples.append(Sample(key=key, pixels=encode_pixels(stored, store), meta=meta))
    if not samples:
        what = "the image is constant" if seen == 1 else f"all {seen} frames/slices are constant"
        raise Rejected("empty", what if seen else "no frames to read")
    return samples, empty


def _check_wanted(src: SourceImage, cfg: IngestConfig) -> None:
    """The settings' choice of what to ingest: modalities, and whether non-image DICOM objects count."""
    if cfg.modalities is not None and src.modality not in cfg.modalities:
        raise Rejected("excluded_modality", f"modality {src.modality} is not in modalities {cfg.modalities}")
    if src.modality in cfg.exclude_modalities:
        raise Rejected("excluded_modality", f"modality {src.modality} is in exclude_modalities")
    if src.format != "dicom" or cfg.non_image_objects:
        return
    sop = f" {src.info.get('sop_class') or ''} "
    what = NON_IMAGE_MODALITIES.get(src.modality) or next(
        (f"a {word.strip()} object" for word in _NON_IMAGE_SOP_WORDS if word in sop), None)
    if what:
        raise Rejected("non_image_object", f"{what} ({src.modality}), not an image of the patient; "
                                           "non_image_objects=true ingests such objects")


# Codes of files left out by the settings' choice, not for a fault: --strict does not count them.
CHOSEN_OUT = ("excluded_modality", "non_image_object")


def process_file(task: FileTask, cfg: IngestConfig, salt: bytes) -> FileOutcome:
    # Library warnings (pydicom's in particular) quote header values: never let them reach a console or log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _process_file(task, cfg, salt)


def _process_file(task: FileTask, cfg: IngestConfig, salt: bytes) -> FileOutcome:
    limits = Limits(max_pixels=cfg.max_pixels, max_frame_side=cfg.max_frame_side,
                    max_memory_bytes=cfg.max_memory_mb << 20)
    src = None
    try:
        src = read_image(_fetched.get(task.path, task.path), limits, cfg.planes, cfg.slice_stride,
                         cfg.nifti_modality, cfg.raster_modality)
        _check_wanted(src, cfg)  # before any frame is decoded
        samples, empty = _samples(task, src, cfg, salt)
        return FileOutcome("ingested", format=src.format, modality=src.modality, samples=samples, empty_frames=empty)
    except Rejected as r:
        detail = scrub(r.detail, src.identifiers if src else None)
        return FileOutcome("rejected", reason=f"{r.code}: {detail}", format=src and src.format,
                           modality=src and src.modality)
    except MemoryError:  # the decode worker's memory cap (or the machine's) was reached
        return FileOutcome("rejected", reason=f"too_large: decoding needed more than the memory budget "
                                              f"(max_memory_mb={cfg.max_memory_mb})",
                           format=src and src.format, modality=src and src.modality)
    except Exception as e:  # a bug in medssl: it must not end a run over millions of files
        # The type only: an exception's message may quote header values.
        return FileOutcome("rejected", reason=f"internal_error: {type(e).__name__} in medssl; please report it",
                           format=src and src.format, modality=src and src.modality)


def process_file_isolated(worker: IsolatedWorker, task: FileTask, cfg: IngestConfig, salt: bytes,
                          seen: tuple[str, str | None] | None = None) -> FileOutcome:
    """``process_file`` in the decode worker; a worker fault becomes this file's rejection.

    A task without ``sha256`` is hashed first, in the same call (one read of storage, one round trip);
    with ``seen`` (``dedup.SeenContent``'s paths) a file whose content a lower index holds is then not
    decoded but returned as a ``duplicate``.
    """
    args = {"task": asdict(task), "cfg": cfg.model_dump(mode="json"), "salt": salt.hex(), "seen": seen}
    try:
        result, pixels = worker.call("serve_process_file", args)
    except Rejected as fault:  # the file cost its worker (timeout, crash, memory)
        return FileOutcome("rejected", reason=f"{fault.code}: {fault.detail}")
    samples = [Sample(key=s["key"], pixels=data, meta=s["meta"]) for s, data in zip(result.pop("samples"), pixels)]
    return FileOutcome(**result, samples=samples)


_cfg_cache: dict[str, IngestConfig] = {}


def serve_process_file(args: dict) -> tuple[dict, list[bytes]]:
    """The decode worker's side of ``process_file_isolated``: JSON in, JSON and PNG bytes out."""
    key = repr(args["cfg"])
    if key not in _cfg_cache:  # one work unit sends the same settings with every file: validate once
        _cfg_cache.clear()
        _cfg_cache[key] = IngestConfig.model_validate(args["cfg"])
    task = FileTask(**args["task"])
    try:
        outcome = _hash_then_process(task, _cfg_cache[key], bytes.fromhex(args["salt"]), args["seen"])
    finally:
        _forget_fetched()  # the object's local copy has served its one decode
    result = {"status": outcome.status, "reason": outcome.reason, "format": outcome.format,
              "modality": outcome.modality, "empty_frames": outcome.empty_frames,
              "sha256": outcome.sha256, "size": outcome.size,
              "samples": [{"key": s.key, "meta": s.meta} for s in outcome.samples]}
    return result, [s.pixels for s in outcome.samples]


def _hash_then_process(task: FileTask, cfg: IngestConfig, salt: bytes, seen: list | None) -> FileOutcome:
    if task.sha256 is not None:
        return process_file(task, cfg, salt)
    size, sha, error = hash_file(task.path)
    if error:
        return FileOutcome("unfinished" if error.startswith("unfinished:") else "rejected", reason=error, size=size)
    if seen is not None and _seen_content(*seen).earlier(sha, task.index):
        return FileOutcome("duplicate", reason="duplicate: same content as an earlier file", sha256=sha, size=size)
    outcome = process_file(FileTask(task.index, task.path, sha), cfg, salt)
    outcome.sha256, outcome.size = sha, size
    return outcome


_seen_cache: dict[tuple, SeenContent] = {}


def _seen_content(seen_db: str, content_db: str | None) -> SeenContent:
    """The worker's connection to the dataset's ``SeenContent`` (one dataset at a time; tried again on the
    next file if it could not be opened)."""
    if (seen_db, content_db) not in _seen_cache or _seen_cache[seen_db, content_db].unavailable:
        for old in _seen_cache.values():
            old.close()
        _seen_cache.clear()
        _seen_cache[seen_db, content_db] = SeenContent(Path(seen_db), Path(content_db) if content_db else None)
    return _seen_cache[seen_db, content_db]
