"""Orchestrate an ingest: open the dataset's plan, stream the listing into work units on the engine, finish."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medssl import storage
from medssl.atomic import atomic_open, remove_stale_tmp
from medssl.config import ConfigError, IngestConfig
from medssl.ingest.chunk import (
    ChunkJob,
    manifest_path,
    prestart_decode_worker,
    run_chunk,
)
from medssl.ingest.dedup import SeenContent
from medssl.ingest.engine import make_engine
from medssl.ingest.output import WRITTEN_FOLDERS, check_output, mark_dataset
from medssl.ingest.pipeline import CHOSEN_OUT
from medssl.ingest.plan import DatasetPlan, open_plan, planned_units, saved_chunks
from medssl.ingest.report import RunStats, finalize
from medssl.lease import Lease, lease
from medssl.privacy import load_salt

log = logging.getLogger("medssl.ingest")


class IngestUnfinished(Exception):
    """The store failed transiently for longer than the retries: units were left for the next run."""


@dataclass
class IngestSummary:
    out: str | Path  # a local folder or a URL
    report: dict

    @property
    def ingested(self) -> int:
        return self.report["status"].get("ingested", 0)

    @property
    def rejected(self) -> int:
        return self.report["status"].get("rejected", 0)

    @property
    def rejected_for_faults(self) -> int:
        """Rejections other than files the settings left out (``pipeline.CHOSEN_OUT``)."""
        codes = self.report.get("rejections_by_code", {})
        return self.rejected - sum(codes.get(code, 0) for code in CHOSEN_OUT)

    def exit_code(self, strict: bool) -> int:
        if self.ingested == 0 or (strict and self.rejected_for_faults):
            return 1
        return 0


# Files of a dataset that need a local file system: the log (appended to) and the content table (SQLite).
# For a dataset in object storage they live in a local folder while ingest runs and are uploaded after.
_LOCAL_FILES = ("ingest.log", "content.sqlite")


def _local_folder(out: str | Path) -> Path:
    """Where ``_LOCAL_FILES`` live: the dataset folder itself, or for a URL a folder under the user's cache
    (``MEDSSL_CACHE``, default ~/.cache/medssl) holding copies fetched from the dataset at the start of every
    run. The dataset's copies are the truth: a local copy may be of a dataset deleted since and made again
    at the same URL (whose content table would call its files duplicates of files it never held)."""
    if not storage.is_url(out):
        return Path(out)
    cache = Path(os.environ.get("MEDSSL_CACHE", Path.home() / ".cache" / "medssl"))
    folder = cache / "datasets" / hashlib.sha256(str(out).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for name in _LOCAL_FILES:
        for journal in ("-wal", "-shm"):  # SQLite would apply a stale journal to the fresh copy
            (folder / f"{name}{journal}").unlink(missing_ok=True)
        if storage.exists(storage.join(out, name)):
            with atomic_open(folder / name) as f:
                f.write(storage.read_bytes(storage.join(out, name)))
        else:
            (folder / name).unlink(missing_ok=True)
    return folder


def _upload_local_files(out: str | Path, local: Path) -> None:
    if storage.is_url(out):
        for name in _LOCAL_FILES:
            if (local / name).exists():
                with atomic_open(storage.join(out, name)) as f:
                    f.write((local / name).read_bytes())


def _log_to_file(folder: Path) -> logging.Handler:
    handler = logging.FileHandler(folder / "ingest.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _close_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()


def ingest(cfg: IngestConfig, show_progress: bool = True) -> IngestSummary:
    """Ingest ``cfg.inputs`` into the dataset ``cfg.out``: a new dataset, the rest of an interrupted run,
    or (on a finished dataset) the files the inputs gained since."""
    if not cfg.inputs:
        raise ConfigError("no inputs: give one or more folders or files to ingest")
    if cfg.out is None:
        raise ConfigError("no output folder: pass --out DIR")
    out = storage.location(cfg.out)
    check_output(out, [storage.location(i) for i in cfg.inputs])
    storage.makedirs(out)
    with lease(out, "ingest", cfg.lease_ttl_s) as held:
        mark_dataset(out)
        if not storage.is_url(out):  # after taking the lease: a live writer's temporary files are not stale
            remove_stale_tmp(out, WRITTEN_FOLDERS)
        local = _local_folder(out)
        handler = _log_to_file(local)
        salt = load_salt(cfg.salt_file)
        unit_cfg = cfg.model_copy(update={"inputs": []})  # the plan holds the paths; don't pickle them per unit
        try:
            plan, mode = open_plan(cfg, out, salt)
            log.info("%s: %s", out, {"new": "new dataset", "resume": "resuming an interrupted run",
                                     "add": "adding the files not ingested yet"}[mode])
            # Decode workers start importing now, while the inputs are listed.
            engine = make_engine(cfg.engine, cfg.workers, cfg.ray_address, prestart_decode_worker, (unit_cfg,))
            try:
                summary = _run(cfg, unit_cfg, out, local, salt, plan, mode, engine, held, show_progress)
            finally:
                engine.close()
        except BaseException:
            _close_log(handler)
            # Best effort: the error that ended the run is the one to report, not a second one from here.
            with contextlib.suppress(Exception):
                _upload_local_files(out, local)
            raise
        _close_log(handler)
        _upload_local_files(out, local)
        return summary


def _run(cfg: IngestConfig, unit_cfg: IngestConfig, out: str | Path, local: Path, salt: bytes, plan: DatasetPlan,
         mode: str, engine, held: Lease, show_progress: bool) -> IngestSummary:
    resumed = listed = 0
    done = saved_chunks(storage.join(out, "manifest"), ".jsonl", plan.current.first_chunk)
    # A cache of the contents units have hashed (dedup.SeenContent), on each machine's local disk.
    seen_db = Path(tempfile.gettempdir()) / f"medssl-seen-{plan.dataset_id}.sqlite"
    content_db = str(local / "content.sqlite") if (local / "content.sqlite").exists() else None
    SeenContent.create(seen_db)

    unfinished: list[tuple[int, str]] = []  # (unit, why) of units the store's faults left undone

    def jobs() -> Iterator[ChunkJob]:
        nonlocal resumed, listed
        for unit in planned_units(plan, out, cfg.workers):
            if unfinished:  # the store is failing: hand out no more units (the next run takes them)
                return
            listed += len(unit.entries)
            bar.set_postfix(listed=listed, images=n_samples)
            if unit.chunk in done:  # by an interrupted run
                resumed += 1
                bar.update(len(unit.entries))
                continue
            files = [(i, plan.path(e), manifest_path(plan.shown(e), cfg, salt), e.error)
                     for i, e in zip(unit.indexes, unit.entries)]
            sizes[unit.chunk] = len(files)
            yield ChunkJob(unit.chunk, files, unit_cfg, str(out), salt, str(seen_db), content_db)

    start = time.perf_counter()
    n_files = n_samples = faults = peak_rss = bytes_read = 0
    worker_cpu = 0.0
    storage_read = 0
    sizes: dict[int, int] = {}  # files per unit handed out
    with tqdm(desc="ingest", unit="file", disable=not show_progress) as bar:
        for summary in engine.run(run_chunk, jobs()):
            if summary.unfinished:
                unfinished.append((summary.chunk, summary.unfinished))
            n_files += summary.files
            n_samples += summary.samples
            bytes_read += summary.bytes_read
            faults += summary.worker_faults
            peak_rss = max(peak_rss, summary.worker_peak_rss_bytes)
            worker_cpu += summary.worker_cpu_seconds
            storage_read += summary.worker_storage_read_bytes
            bar.update(summary.files)
            bar.set_postfix(images=n_samples)
            held.check()
    if unfinished:
        files = sum(sizes[chunk] for chunk, _ in unfinished)
        why = unfinished[0][1].removeprefix("unfinished: ")
        message = (f"{files} files left unfinished ({len(unfinished)} work units): {why}. None was rejected for it; "
                   "rerun the same command to finish them")
        log.error(message)
        raise IngestUnfinished(message)
    stats = RunStats(time.perf_counter() - start, n_files, n_samples, cfg.workers, cfg.engine, resumed,
                     cfg.max_memory_mb, cfg.file_timeout_s, bytes_read, faults, peak_rss, worker_cpu, storage_read,
                     mode)
    report = finalize(out, plan, stats, local / "content.sqlite")
    for suffix in ("", "-wal", "-shm"):  # content.sqlite now holds what the cache knew
        Path(f"{seen_db}{suffix}").unlink(missing_ok=True)
    plan.current.finished = True
    if cfg.redact_paths:  # the plan is the one place that must hold real paths; not kept past completion
        plan.drop_paths(out, salt)
    plan.save(out)
    for r in report["rejected"]:
        log.info("rejected %s: %s", r["path"], r["reason"])
    log.info("done: %s", {k: v for k, v in report.items() if k in ("files", "status", "samples", "shards")})
    return IngestSummary(out, report)
