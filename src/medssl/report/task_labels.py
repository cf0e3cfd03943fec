"""Labels of a task CSV, keyed by file content, to colour shard samples by label.

Shards carry no paths, but every sample records the SHA-256 of its source file, so a task image that
was also ingested is found by hashing the file the CSV names. A path ending in ``#N`` labels frame N
only; otherwise every image of the file carries the row's label. Paths may lead outside the CSV's folder
(unlike a task's, ``tasks.leaves_folder``): a file here is only hashed, to be matched with shard samples,
never decoded or shown.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from medssl.downstream.decode import resolve_path
from medssl.downstream.tasks import TaskError, read_csv_rows
from medssl.report.collect import ReportError


class TaskLabels:
    def __init__(self, csv_path: Path):
        self.csv = Path(csv_path)
        self.by_source: dict[tuple[str, int | None], str] = {}
        self.rows = 0
        self.missing: list[str] = []
        try:
            columns, rows = read_csv_rows(self.csv)
        except TaskError as e:
            raise ReportError(f"--task {e}") from None
        if not rows or not {"path", "label"} <= set(columns):
            raise ReportError(f"--task {self.csv}: needs a header with columns path,label and at least one row")
        for row in rows:
            path, frame = resolve_path(self.csv.parent, row["path"].strip())
            self.rows += 1
            if not path.is_file():
                self.missing.append(row["path"])
                continue
            self.by_source[(_sha256(path), frame)] = (row["label"] or "").strip() or "(none)"

    def label_of(self, meta: dict) -> str | None:
        source = meta.get("source", {})
        sha = source.get("sha256")
        return self.by_source.get((sha, source.get("frame"))) or self.by_source.get((sha, None))

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.by_source.values()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
