"""Finish an ingest: merge the per-unit manifests, index the shards, write the human-readable report."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from medssl.atomic import atomic_write_text
from medssl.ingest.chunk import part_path


@dataclass
class RunStats:
    seconds: float        # processing time of this run (scan and hashing excluded)
    files: int            # files processed by this run (resumed units not counted)
    samples: int
    workers: int
    engine: str
    resumed_units: int
    max_memory_mb: int    # the decode workers' budgets
    file_timeout_s: float
    worker_faults: int = 0            # files of this run that cost their decode worker
    worker_peak_rss_bytes: int = 0    # the largest decode worker of this run
    worker_cpu_seconds: float = 0.0   # decode workers' CPU time (the processes' own usage leaves it out)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else 0.0


def finalize(out: Path, n_chunks: int, n_files: int, stats: RunStats) -> dict:
    rows = []
    for chunk in range(n_chunks):
        rows += [json.loads(line) for line in part_path(out, chunk).read_text().splitlines()]
    if len(rows) != n_files:
        raise RuntimeError(f"manifest has {len(rows)} rows for {n_files} planned files; rerun the command to repair")
    rows.sort(key=lambda r: r["index"])
    atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    shard_samples: Counter = Counter()
    for r in rows:
        if r.get("shard"):
            shard_samples[r["shard"]] += len(r["samples"])
    shards = [{"name": name, "samples": shard_samples[name], "bytes": (out / "shards" / name).stat().st_size}
              for name in sorted(shard_samples)]
    atomic_write_text(out / "index.json", json.dumps(
        {"format": "medssl-shards/1", "samples": sum(shard_samples.values()), "shards": shards}, indent=1))

    status = Counter(r["status"] for r in rows)
    by_modality: dict = defaultdict(lambda: {"files": 0, "samples": 0})
    for r in rows:
        if r["status"] == "ingested":
            by_modality[r["modality"]]["files"] += 1
            by_modality[r["modality"]]["samples"] += len(r["samples"])
    rejected = [{"path": r["path"], "reason": r["reason"]} for r in rows if r["status"] == "rejected"]
    report = {
        "files": len(rows),
        "status": dict(status),
        "samples": sum(shard_samples.values()),
        "shards": len(shards),
        "shard_bytes": sum(s["bytes"] for s in shards),
        "by_modality": dict(sorted(by_modality.items())),
        "by_format": dict(Counter(r.get("format") or "unknown" for r in rows if r["status"] == "ingested")),
        "rejections_by_code": dict(Counter(r["reason"].split(":")[0] for r in rows if r["status"] == "rejected")),
        "rejected": rejected,
        "duplicates": [{"path": r["path"], "reason": r["reason"]} for r in rows if r["status"] == "duplicate"],
        "throughput": {
            "seconds": round(stats.seconds, 2), "files_processed": stats.files, "samples_written": stats.samples,
            "files_per_s": _rate(stats.files, stats.seconds), "images_per_s": _rate(stats.samples, stats.seconds),
            "workers": stats.workers, "engine": stats.engine, "units_done_by_earlier_runs": stats.resumed_units,
        },
        "isolation": {
            "max_memory_mb": stats.max_memory_mb, "file_timeout_s": stats.file_timeout_s,
            "worker_peak_rss_mb": round(stats.worker_peak_rss_bytes / 2**20, 1),
            "worker_faults": stats.worker_faults, "worker_cpu_s": round(stats.worker_cpu_seconds, 2),
        },
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


# "_" is left alone: inside words (reason codes, most file names) CommonMark never reads it as emphasis.
_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*[]<>|"})


def _md(text: str) -> str:
    """Text shown literally in Markdown, also inside a table cell (paths may hold ``|``, ``*``, ``<``)."""
    return text.translate(_MARKDOWN_SPECIAL)


def render_markdown(report: dict) -> str:
    t, iso = report["throughput"], report["isolation"]
    lines = [
        "# medssl ingest report", "",
        f"{report['files']} input files: " + ", ".join(f"{n} {s}" for s, n in sorted(report["status"].items())) + ".",
        f"{report['samples']} images in {report['shards']} shards ({report['shard_bytes'] / 1e6:.1f} MB).", "",
        "## By modality", "", "| modality | files | images |", "| --- | ---: | ---: |",
    ]
    lines += [f"| {m} | {v['files']} | {v['samples']} |" for m, v in report["by_modality"].items()]
    lines += ["", "## Throughput (this run)", "",
              f"{t['files_processed']} files and {t['samples_written']} images in {t['seconds']} s "
              f"({t['files_per_s']} files/s, {t['images_per_s']} images/s) with {t['workers']} "
              f"{t['engine']} worker(s); {t['units_done_by_earlier_runs']} work units were already done.",
              f"Decode workers: budget {iso['max_memory_mb']} MB and {iso['file_timeout_s']:g} s per file; "
              f"largest {iso['worker_peak_rss_mb']} MB; {iso['worker_faults']} files cost their worker "
              "(timeout, crash or memory; replaced).", ""]
    if report["rejections_by_code"]:
        lines += ["## Rejected files", "", "| reason | files |", "| --- | ---: |"]
        lines += [f"| {_md(code)} | {n} |" for code, n in sorted(report["rejections_by_code"].items())]
        lines += ["", "| file | reason |", "| --- | --- |"]
        lines += [f"| {_md(r['path'])} | {_md(r['reason'])} |" for r in report["rejected"]]
        lines.append("")
    if report["duplicates"]:
        lines += ["## Duplicates (same content as an earlier file; not ingested again)", ""]
        lines += [f"- {_md(d['path'])}: {_md(d['reason'])}" for d in report["duplicates"]]
        lines.append("")
    return "\n".join(lines)
