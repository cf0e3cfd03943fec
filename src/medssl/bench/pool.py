"""The bench's inputs: each task's CSV as the bench reads it, and the unlabeled pretraining pool.

The pool is what pretraining may see: the training-split files of every task (their labels unused)
plus any extra unlabeled folders. A task's validation and test images must never be in it, or the
pretrained encoder would have seen the images it is scored on. Files are compared by content
(SHA-256), not by name: real data sets hold the same image under two names, e.g. one copy in train
and one in test. A volume that gives a test slice (``vol.nii.gz#40``) is left out whole.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from medssl.atomic import atomic_write_text
from medssl.config import BenchTask
from medssl.downstream.decode import resolve_path
from medssl.downstream.tasks import Task, TaskError, leaves_folder, read_csv_rows
from medssl.ingest.pipeline import hash_file


def write_task_csv(task: BenchTask, folder: Path, paths_outside_csv: bool = False) -> Path:
    """``folder/<name>.csv``: the task CSV with absolute paths (it moves folders) and ``relabel`` applied.
    Its paths are checked against the user's CSV folder here (``paths_outside_csv``, as in a finetune); the
    runs read the copy with ``bench.runs.task_settings``, which allows its absolute paths."""
    src = Path(task.csv)
    if not src.is_file():
        raise TaskError(f"task {task.name}: task CSV {src} does not exist")
    try:
        columns, rows = read_csv_rows(src)
    except TaskError as e:
        raise TaskError(f"task {task.name}: {e}") from None
    if "path" not in columns or "label" not in columns:
        raise TaskError(f"task {task.name}: {src} needs the columns path,label (has {columns})")
    outside = [r["path"] for r in rows if not paths_outside_csv and leaves_folder(r["path"] or "")]
    if outside:
        raise TaskError(f"task {task.name}: {len(outside)} path(s) of {src} lead outside its folder, e.g. "
                        f"{outside[0][:200]!r} (set paths_outside_csv: true in the task's settings to allow them)")
    unknown = set(task.relabel) - {part.strip() for r in rows for part in (r["label"] or "").split("|")}
    if unknown:
        raise TaskError(f"task {task.name}: relabel names classes that {src} does not have: {sorted(unknown)}")
    base = os.path.abspath(src.parent)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        labels = [task.relabel.get(part.strip(), part.strip()) for part in (r["label"] or "").split("|")]
        writer.writerow({**r, "path": os.path.join(base, r["path"]), "label": "|".join(dict.fromkeys(labels))})
    out = Path(folder) / f"{task.name}.csv"
    atomic_write_text(out, buf.getvalue())
    return out


@dataclass
class Pool:
    files: list[Path]                                   # what pretraining may read
    summary: dict = field(default_factory=dict)         # per source: files offered, left out and why


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TaskError(f"unlabeled input {path} does not exist")
    return [Path(d) / name for d, dirs, names in sorted(os.walk(path)) for name in sorted(names)
            if not name.startswith(".")]


def _task_files(task: Task, split: str) -> list[Path]:
    return [resolve_path(task.table.csv.parent, task.table.paths[i])[0] for i in task.rows(split)]


def pretraining_pool(tasks: dict[str, Task], unlabeled: list[Path]) -> Pool:
    """Training-split files of every task plus ``unlabeled``, less any copy of a val/test image."""
    held_out = {p.resolve() for t in tasks.values() for s in ("val", "test") for p in _task_files(t, s)}
    held_hashes = {hash_file(str(p))[1] for p in held_out} - {None}
    held_sizes = {p.stat().st_size for p in held_out if p.is_file()}

    def is_held_out(path: Path) -> bool:
        if path.resolve() in held_out:
            return True
        # Only a file of a held-out file's size can be a copy of it: most files are never hashed here.
        return path.stat().st_size in held_sizes and hash_file(str(path))[1] in held_hashes

    sources = [(f"task {name}: train split", _task_files(t, "train")) for name, t in tasks.items()]
    sources += [(f"unlabeled: {p}", _files_under(Path(p))) for p in unlabeled]
    chosen: dict[Path, None] = {}
    summary = {}
    for label, files in sources:
        kept = [f for f in files if f.is_file() and not is_held_out(f)]
        summary[label] = {"files": len(files), "pooled": len(kept), "held_out_copies": len(files) - len(kept)}
        chosen.update(dict.fromkeys(f.resolve() for f in kept))
    return Pool(list(chosen), summary)
