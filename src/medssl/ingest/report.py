"""Finish a generation of an ingest: resolve duplicates across units, extend the shard index, write the report.

Everything streams over the generation's manifest parts, one unit at a time: the driver's memory does
not grow with the archive. The report covers the whole dataset (earlier generations' counts come from
the previous report.json) and lists at most ``LISTED`` rejected and duplicate files; the manifest parts
hold every row.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medssl import storage
from medssl.artifacts import INDEX, DatasetIndex, read_index
from medssl.atomic import atomic_write_text
from medssl.ingest.chunk import part_path
from medssl.ingest.dedup import ContentIndex, record_unit, resolve_unit
from medssl.ingest.plan import DatasetPlan

LISTED = 1000  # rejected / duplicate files named in the report (all are in the manifest)


@dataclass
class RunStats:
    seconds: float        # processing time of this run (listing overlaps it)
    files: int            # files processed by this run (units done by an interrupted run not counted)
    samples: int
    workers: int
    engine: str
    resumed_units: int
    max_memory_mb: int    # the decode workers' budgets
    file_timeout_s: float
    bytes_read: int = 0               # input bytes read by this run
    worker_faults: int = 0            # files of this run that cost their decode worker
    worker_peak_rss_bytes: int = 0    # the largest decode worker of this run
    worker_cpu_seconds: float = 0.0   # decode workers' CPU time (the processes' own usage leaves it out)
    worker_storage_read_bytes: int = 0  # what decode workers read from storage (page-cache hits excluded)
    mode: str = "new"                 # new | resume | add (a generation on a finished dataset)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else 0.0


def _rows(part: str | Path) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(part).splitlines()]


def read_manifest(out: Path) -> Iterator[dict]:
    """Every manifest row of a dataset, one unit's part at a time (units take their files from all over a
    block of the listing: sort by ``index`` for listing order)."""
    folder = storage.join(storage.location(out), "manifest")
    for name in storage.listdir(folder):
        if name.startswith("chunk-") and name.endswith(".jsonl"):
            yield from _rows(storage.join(folder, name))


class _Totals:
    """The report's counts, added up row by row (and carried over from the previous report)."""

    def __init__(self, previous: dict | None):
        p = previous or {}
        self.files = p.get("files", 0)
        self.status = Counter(p.get("status", {}))
        self.by_modality = {m: dict(v) for m, v in p.get("by_modality", {}).items()}
        self.by_format = Counter(p.get("by_format", {}))
        self.codes = Counter(p.get("rejections_by_code", {}))
        self.rejected = list(p.get("rejected", []))
        self.duplicates = list(p.get("duplicates", []))

    def add(self, r: dict) -> None:
        self.files += 1
        self.status[r["status"]] += 1
        if r["status"] == "ingested":
            m = self.by_modality.setdefault(r["modality"], {"files": 0, "samples": 0})
            m["files"] += 1
            m["samples"] += len(r["samples"])
            self.by_format[r.get("format") or "unknown"] += 1
        elif r["status"] == "rejected":
            self.codes[r["reason"].split(":")[0]] += 1
            if len(self.rejected) < LISTED:
                self.rejected.append({"path": r["path"], "reason": r["reason"]})
        elif len(self.duplicates) < LISTED:
            self.duplicates.append({"path": r["path"], "reason": r["reason"]})


def finalize(out: str | Path, plan: DatasetPlan, stats: RunStats, content_db: Path) -> dict:
    """Finish the plan's current generation (its units are all done) and return the dataset's report.
    ``content_db``: the dataset's content.sqlite, a local file (SQLite needs one)."""
    gen = plan.current
    first_generation = len(plan.generations) == 1
    previous = None if first_generation else json.loads(storage.read_text(storage.join(out, "report.json")))
    index = read_index(out).model_dump() if not first_generation else {"shards": []}
    totals = _Totals(previous)
    content = ContentIndex(content_db)
    new_shards: Counter = Counter()
    rows_seen = 0
    chunks = range(gen.first_chunk, gen.first_chunk + gen.chunks)
    try:
        for chunk in chunks:
            record_unit(content, _rows(part_path(out, chunk)))
        content.commit()
        for chunk in chunks:
            part = part_path(out, chunk)
            rows = _rows(part)
            for r in resolve_unit(content, rows, part, storage.join(out, "shards")):
                totals.add(r)
                new_shards.update(r.get("shards", []))
            rows_seen += len(rows)
            content.commit()
    finally:
        content.close()
    if rows_seen != gen.files:
        raise RuntimeError(f"the manifest has {rows_seen} rows for the {gen.files} files planned in this run; "
                           "rerun the command to repair")

    shards = index["shards"] + [{"name": n, "samples": new_shards[n],
                                 "bytes": storage.size(storage.join(out, "shards", n))}
                                for n in sorted(new_shards)]
    samples = sum(s["samples"] for s in shards)
    # The index is what readers see: replaced in one step, listing only finished shards.
    atomic_write_text(storage.join(out, INDEX), _index_text(samples, shards))
    report = {
        "files": totals.files,
        "status": dict(totals.status),
        "samples": samples,
        "shards": len(shards),
        "shard_bytes": sum(s["bytes"] for s in shards),
        "by_modality": dict(sorted(totals.by_modality.items())),
        "by_format": dict(totals.by_format),
        "rejections_by_code": dict(totals.codes),
        "rejected": sorted(totals.rejected, key=lambda r: r["path"]),
        "duplicates": sorted(totals.duplicates, key=lambda r: r["path"]),
        "generations": len(plan.generations),
        "this_run": {"mode": stats.mode, "files": gen.files, "samples": sum(new_shards.values()),
                     "bytes_read": stats.bytes_read},
        "throughput": {
            "seconds": round(stats.seconds, 2), "files_processed": stats.files, "samples_written": stats.samples,
            "files_per_s": _rate(stats.files, stats.seconds), "images_per_s": _rate(stats.samples, stats.seconds),
            "workers": stats.workers, "engine": stats.engine, "units_done_by_earlier_runs": stats.resumed_units,
        },
        "isolation": {
            "max_memory_mb": stats.max_memory_mb, "file_timeout_s": stats.file_timeout_s,
            "worker_peak_rss_mb": round(stats.worker_peak_rss_bytes / 2**20, 1),
            "worker_faults": stats.worker_faults, "worker_cpu_s": round(stats.worker_cpu_seconds, 2),
            "worker_storage_read_bytes": stats.worker_storage_read_bytes,
        },
    }
    atomic_write_text(storage.join(out, "report.json"), json.dumps(report, indent=1))
    atomic_write_text(storage.join(out, "report.md"), render_markdown(report))
    return report


# "_" is left alone: inside words (reason codes, most file names) CommonMark never reads it as emphasis.
_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*[]<>|"})


def _md(text: str) -> str:
    """Text shown literally in Markdown, also inside a table cell (paths may hold ``|``, ``*``, ``<``)."""
    return text.translate(_MARKDOWN_SPECIAL)


def _index_text(samples: int, shards: list[dict]) -> str:
    """index.json with one shard per line: easy to diff, grep and read line by line."""
    lines = ",\n".join(json.dumps(s) for s in shards)
    return f'{{"format": "{DatasetIndex.FORMAT}", "samples": {samples}, "shards": [\n{lines}\n]}}\n'


def render_markdown(report: dict) -> str:
    t, iso, run = report["throughput"], report["isolation"], report["this_run"]
    added = {"new": "started the dataset", "resume": "finished an interrupted run",
             "add": "added the files new since the last run"}[run["mode"]]
    lines = [
        "# medssl ingest report", "",
        f"{report['files']} input files: " + ", ".join(f"{n} {s}" for s, n in sorted(report["status"].items())) + ".",
        f"{report['samples']} images in {report['shards']} shards ({report['shard_bytes'] / 1e6:.1f} MB).",
        f"This run {added}: {run['files']} files, {run['samples']} images "
        f"(ingest run {report['generations']} into this dataset).", "",
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
        lines += _more(len(report["rejected"]), report["status"].get("rejected", 0))
        lines.append("")
    if report["duplicates"]:
        lines += ["## Duplicates (same content as an earlier file; not ingested again)", ""]
        lines += [f"- {_md(d['path'])}: {_md(d['reason'])}" for d in report["duplicates"]]
        lines += _more(len(report["duplicates"]), report["status"].get("duplicate", 0))
        lines.append("")
    return "\n".join(lines)


def _more(listed: int, total: int) -> list[str]:
    if total <= listed:
        return []
    return ["", f"The first {listed} of {total} are listed; the manifest (manifest/*.jsonl) has every row."]
