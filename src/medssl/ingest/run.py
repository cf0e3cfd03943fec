"""Orchestrate an ingest: plan (or load the plan of an interrupted run), run the work units, finish."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medssl.atomic import remove_stale_tmp
from medssl.config import ConfigError, IngestConfig
from medssl.ingest.chunk import ChunkJob, manifest_path, part_path, prestart_decode_worker, run_chunk
from medssl.ingest.engine import make_engine
from medssl.ingest.pipeline import FileTask
from medssl.ingest.plan import Plan, build_plan, processing_settings
from medssl.ingest.report import RunStats, finalize
from medssl.privacy import load_salt

log = logging.getLogger("medssl.ingest")


@dataclass
class IngestSummary:
    out: Path
    report: dict

    @property
    def ingested(self) -> int:
        return self.report["status"].get("ingested", 0)

    @property
    def rejected(self) -> int:
        return self.report["status"].get("rejected", 0)

    def exit_code(self, strict: bool) -> int:
        if self.ingested == 0 or (strict and self.rejected):
            return 1
        return 0


def _log_to_file(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "ingest.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _load_or_build_plan(cfg: IngestConfig, out: Path, engine, show_progress: bool) -> Plan:
    plan_file = out / "plan.json"
    if plan_file.exists():
        plan = Plan.load(plan_file)
        wanted = processing_settings(cfg)
        changed = [k for k in wanted if plan.settings.get(k) != wanted[k]]
        if changed:
            diffs = ", ".join(f"{k}: {plan.settings.get(k)!r} -> {wanted[k]!r}" for k in changed)
            raise ConfigError(f"{out} holds an ingest made with other settings ({diffs}). "
                              "Rerun with the same settings to resume, or choose another --out.")
        log.info("resuming from %s (%d files)", plan_file, len(plan.files))
        return plan
    with tqdm(desc="scan + hash", unit="file", disable=not show_progress) as bar:
        plan = build_plan(cfg, engine.run, bar.update)
    plan.save(plan_file)
    log.info("planned %d files in %d work units", len(plan.files), len(plan.chunks()))
    return plan


def ingest(cfg: IngestConfig, show_progress: bool = True) -> IngestSummary:
    if not cfg.inputs:
        raise ConfigError("no inputs: give one or more folders or files to ingest")
    if cfg.out is None:
        raise ConfigError("no output folder: pass --out DIR")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    handler = _log_to_file(out)
    salt = load_salt(cfg.salt_file)
    unit_cfg = cfg.model_copy(update={"inputs": []})  # the plan holds the paths; don't pickle them per unit
    # Decode workers start importing now, while the inputs are scanned and hashed.
    engine = make_engine(cfg.engine, cfg.workers, cfg.ray_address, prestart_decode_worker, (unit_cfg,))
    try:
        plan = _load_or_build_plan(cfg, out, engine, show_progress)
        chunks = plan.chunks()
        todo = [c for c in range(len(chunks)) if not part_path(out, c).exists()]

        def job(c: int) -> ChunkJob:
            files = []
            for i in chunks[c]:
                f = plan.files[i]
                dup = plan.files[f.duplicate_of] if f.duplicate_of is not None else None
                files.append((FileTask(i, plan.path(i), f.sha256), manifest_path(_rel(plan, i), cfg, salt), f.error,
                              manifest_path(_rel(plan, f.duplicate_of), cfg, salt) if dup else None))
            return ChunkJob(c, files, unit_cfg, str(out), salt)

        start = time.perf_counter()
        n_files = n_samples = faults = peak_rss = 0
        worker_cpu = 0.0
        with tqdm(total=sum(len(chunks[c]) for c in todo), desc="ingest", unit="file",
                  disable=not show_progress) as bar:
            for summary in engine.run(run_chunk, (job(c) for c in todo)):
                n_files += summary.files
                n_samples += summary.samples
                faults += summary.worker_faults
                peak_rss = max(peak_rss, summary.worker_peak_rss_bytes)
                worker_cpu += summary.worker_cpu_seconds
                bar.update(summary.files)
                bar.set_postfix(images=n_samples)
        stats = RunStats(time.perf_counter() - start, n_files, n_samples, cfg.workers, cfg.engine,
                         len(chunks) - len(todo), cfg.max_memory_mb, cfg.file_timeout_s, faults, peak_rss,
                         worker_cpu)
        report = finalize(out, len(chunks), len(plan.files), stats)
        for r in report["rejected"]:
            log.info("rejected %s: %s", r["path"], r["reason"])
        log.info("done: %s", {k: v for k, v in report.items() if k in ("files", "status", "samples", "shards")})
        if cfg.redact_paths:  # the plan is the one file that must hold real paths; not kept past completion
            (out / "plan.json").unlink()
        return IngestSummary(out, report)
    finally:
        engine.close()
        log.removeHandler(handler)
        handler.close()


def _rel(plan: Plan, i: int) -> str:
    """A file's path as shown to people: relative to its input root, prefixed by the root's folder name."""
    f = plan.files[i]
    root_name = Path(plan.roots[f.root]).name
    return f"{root_name}/{f.rel}" if f.rel else root_name
