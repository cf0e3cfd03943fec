"""Task CSVs (contract in ../shared/DESIGN.md): labels and task type, splits, label subsets.

Columns ``path,label`` and optionally ``split`` (train/val/test) and ``group`` (patient or study id);
other columns are ignored. ``path`` is relative to the CSV's folder; ``label`` is a class name, the
labels of a multi-label row joined with ``|`` (an empty label there means "none of them").

Task type (``task_type=auto``): multi-label if any label holds ``|``, else binary for two classes and
multi-class for more. Every task becomes K model outputs with 0/1 targets: binary K=1 (the positive
class), multi-class K=C (one-hot, softmax), multi-label K=C (sigmoid each).

Splits: a ``split`` column is followed as given; a group never crosses splits (an error otherwise).
A missing val or test split (or both, when there is no ``split`` column) is carved out of train:
``val_fraction`` and ``test_fraction`` (default 15% each) of the training images, whole groups at a
time, stratified by class, seeded by ``split_seed``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import Tensor

from medssl.config import ConfigError, FinetuneConfig
from medssl.downstream.images import load_images
from medssl.downstream.kinds import KINDS

SPLITS = ("train", "val", "test")
_LIST_LIMIT = 50  # rows listed in one error message; the count says how many more


class TaskError(ValueError):
    """A problem with a task CSV or its images, worded for the person who wrote the CSV."""


def _listing(lines: list[str]) -> str:
    shown = [f"  {line}" for line in lines[:_LIST_LIMIT]]
    if len(lines) > _LIST_LIMIT:
        shown.append(f"  ... and {len(lines) - _LIST_LIMIT} more")
    return "\n".join(shown)


@dataclass
class TaskTable:
    """The rows of a task CSV, parsed; no images."""

    csv: Path
    kind: str                 # binary | multiclass | multilabel
    classes: list[str]        # sorted class names
    outputs: list[str]        # one name per model output: binary -> [positive class], else the classes
    paths: list[str]          # as written in the CSV
    labels: list[str]         # as written in the CSV
    targets: np.ndarray       # (N, len(outputs)) float32 0/1
    splits: list[str] | None  # the CSV's split column, None without one
    groups: list[str]         # the CSV's group column; each row its own group without one

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray) -> TaskTable:
        return replace(self, paths=[self.paths[i] for i in rows], labels=[self.labels[i] for i in rows],
                       targets=self.targets[rows], groups=[self.groups[i] for i in rows],
                       splits=None if self.splits is None else [self.splits[i] for i in rows])

    def strata(self) -> np.ndarray:
        """(N, S) 0/1: the classes a row counts toward when splits and subsets are stratified."""
        return KINDS[self.kind].strata(self.targets)


def _row_labels(label: str, multilabel: bool) -> list[str]:
    if multilabel:
        return sorted({part.strip() for part in label.split("|") if part.strip()})
    return [label.strip()]


def read_csv_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The column names (stripped) and rows of a UTF-8 CSV file.

    A file that is not CSV text (another encoding, a binary file, a field longer than the csv module's
    limit of 131,072 characters, which no path or label needs) is a one-line ``TaskError`` naming it.
    The whole file is read first so that an encoding error can be placed on its line.
    """
    try:
        data = Path(csv_path).read_bytes()
    except OSError as e:
        raise TaskError(f"{csv_path} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # utf-8-sig: spreadsheets write a BOM
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TaskError(f"{csv_path} is not UTF-8 text (line {line}): save it as a UTF-8 CSV, or check that it is "
                        "a CSV at all") from None
    if "\x00" in text:  # valid UTF-8 can still hold NUL bytes, which no text file has
        raise TaskError(f"{csv_path} holds NUL bytes: it is a binary file, not a CSV")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        rows = list(reader)
    except csv.Error as e:
        # reader.reader: DictReader's own line_num is updated only after a row was read whole.
        raise TaskError(f"{csv_path} line {reader.reader.line_num} cannot be read as CSV ({e}): check that it is "
                        "a CSV of paths and labels") from None
    return columns, rows


def leaves_folder(raw: str) -> bool:
    """Whether a CSV path leads outside the CSV's folder: absolute, or climbing out with ``..`` (judged on
    the name, not on where links lead: a link the user placed in the folder is theirs to follow)."""
    path = raw.strip()
    if os.path.isabs(path):
        return True
    norm = os.path.normpath(path)
    return norm == ".." or norm.startswith(".." + os.sep)


def _shown_header(columns: list[str]) -> str:
    """The header as an error quotes it: a binary file's "header" can be kilobytes long."""
    text = ", ".join(shown if len(shown := repr(c)) <= 40 else shown[:37] + "..." for c in columns[:8])
    return f"[{text}{', ...' if len(columns) > 8 else ''}]"


def read_task_csv(csv_path: Path, task_type: str = "auto", positive_class: str | None = None,
                  paths_outside_csv: bool = False) -> TaskTable:
    """Parse and check a task CSV; every problem of the file is reported in one ``TaskError``."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        raise TaskError(f"task CSV {csv_path} is a folder: give the CSV file (path,label[,split][,group])")
    if not csv_path.exists():
        raise TaskError(f"task CSV {csv_path} does not exist")
    if not csv_path.is_file():
        raise TaskError(f"task CSV {csv_path} is not a regular file (a FIFO or a device)")
    columns, rows = read_csv_rows(csv_path)
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise TaskError(f"{csv_path}: no column {' or '.join(missing)} in the header {_shown_header(columns)}; "
                        "a task CSV has the columns path,label[,split][,group]")
    if not rows:
        raise TaskError(f"{csv_path} has a header but no rows")

    multilabel = task_type == "multilabel" or (task_type == "auto" and any("|" in (r["label"] or "") for r in rows))
    problems = []
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        if not (r["path"] or "").strip():
            problems.append(f"line {line}: empty path")
        elif not paths_outside_csv and leaves_folder(r["path"]):
            problems.append(f"line {line}: {r['path'][:200]!r} leads outside the CSV's folder (set "
                            "paths_outside_csv=true to allow it)")
        if not multilabel and not (r["label"] or "").strip():
            problems.append(f"line {line}: empty label")
        if "split" in columns and (r["split"] or "").strip().lower() not in SPLITS:
            problems.append(f"line {line}: split {r['split']!r} is not one of {', '.join(SPLITS)}")
        if "group" in columns and not (r["group"] or "").strip():
            problems.append(f"line {line}: empty group")
    if problems:
        raise TaskError(f"{csv_path} has {len(problems)} problem(s):\n{_listing(problems)}")

    row_labels = [_row_labels(r["label"], multilabel) for r in rows]
    classes = sorted({c for labels in row_labels for c in labels})
    if multilabel:
        kind = "multilabel"
    elif task_type in ("binary", "multiclass"):
        kind = task_type
    else:
        kind = "binary" if len(classes) == 2 else "multiclass"
    if kind == "binary" and len(classes) != 2:
        raise TaskError(f"{csv_path}: a binary task needs exactly 2 classes, found {len(classes)}: {classes}")
    if len(classes) < 2 and kind != "multilabel":
        raise TaskError(f"{csv_path}: only one class ({classes}); a task needs at least two")
    if positive_class is not None and (kind != "binary" or positive_class not in classes):
        raise TaskError(f"{csv_path}: positive_class={positive_class!r} needs a binary task with that class; "
                        f"this task is {kind} with classes {classes}")

    if kind == "binary":
        outputs = [positive_class or classes[1]]
    else:
        outputs = classes
    position = {c: k for k, c in enumerate(outputs)}
    targets = np.zeros((len(rows), len(outputs)), dtype=np.float32)
    for i, labels in enumerate(row_labels):
        for c in labels:
            if c in position:  # binary: the negative class has no output
                targets[i, position[c]] = 1.0
    return TaskTable(
        csv=csv_path, kind=kind, classes=classes, outputs=outputs,
        paths=[r["path"].strip() for r in rows], labels=[r["label"] or "" for r in rows], targets=targets,
        splits=[r["split"].strip().lower() for r in rows] if "split" in columns else None,
        groups=[r["group"].strip() for r in rows] if "group" in columns else [f"row{i}" for i in range(len(rows))],
    )


def _carve(table: TaskTable, train_rows: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Move whole groups of ``train_rows`` to the splits in ``fractions``, stratified by class.

    Greedy over groups in a seeded order: a group goes to the carved split that still needs the
    most of its classes, provided that split still needs at least half of what the group brings of
    each of them; otherwise it stays in train. Each class with enough images (one per carved split
    plus one for train) gets at least one image in every carved split, so AUCs are defined.
    """
    strata = table.strata()[train_rows]
    names = sorted({table.groups[i] for i in train_rows})
    index = {g: k for k, g in enumerate(names)}
    group_of = np.array([index[table.groups[i]] for i in train_rows])
    counts = np.zeros((len(names), strata.shape[1]))
    np.add.at(counts, group_of, strata)
    totals = counts.sum(0)
    need = {s: np.where(totals >= len(fractions) + 1, np.maximum(f * totals, 1.0), f * totals)
            for s, f in fractions.items()}

    assigned = {}
    for g in np.random.default_rng(seed).permutation(len(names)):
        brings = counts[g] > 0
        best, best_need = "train", 0.0
        for s in fractions:
            if np.all(need[s][brings] >= counts[g][brings] / 2) and need[s][brings].sum() > best_need:
                best, best_need = s, need[s][brings].sum()
        if best != "train":
            need[best] -= counts[g]
        assigned[g] = best
    return {s: [int(r) for r, g in zip(train_rows, group_of) if assigned[g] == s] for s in fractions}


def assign_splits(table: TaskTable, val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[np.ndarray, dict[str, str]]:
    """Each row's split and where each split came from (``csv`` or ``carved``)."""
    split = np.array(table.splits if table.splits is not None else ["train"] * len(table), dtype=object)
    crossing = {}
    for g, s in zip(table.groups, split):
        crossing.setdefault(g, set()).add(s)
    crossing = {g: s for g, s in crossing.items() if len(s) > 1}
    if crossing:
        lines = [f"group {g!r} is in {', '.join(sorted(s))}" for g, s in sorted(crossing.items())]
        raise TaskError(f"{table.csv}: {len(crossing)} group(s) cross splits; a group (patient, study) must stay "
                        f"in one split or the test score is optimistic:\n{_listing(lines)}")

    fractions = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in set(split)}
    origin = {s: "carved" if s in fractions else "csv" for s in ("val", "test")}
    if fractions:
        train_rows = np.flatnonzero(split == "train")
        for s, rows in _carve(table, train_rows, fractions, seed).items():
            split[rows] = s
    empty = [s for s in SPLITS if not np.any(split == s)]
    if empty:
        raise TaskError(f"{table.csv}: the {' and '.join(empty)} split(s) would be empty "
                        f"({len(table)} images); a task needs images in train, val and test")
    return split.astype(str), origin


def label_subset(table: TaskTable, rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified ``fraction`` of ``rows`` (at least one row of each label combination)."""
    if fraction >= 1:
        return np.sort(rows)
    rng = np.random.default_rng(seed)
    keys = [tuple(r) for r in table.strata()[rows].astype(int)]
    picked = []
    for key in sorted(set(keys)):
        members = rows[[k == key for k in keys]]
        n = max(1, round(fraction * len(members)))
        picked.extend(rng.choice(members, size=n, replace=False).tolist())
    return np.sort(np.array(picked, dtype=int))


# The settings that shape a prepared Task: a Task made with other values cannot serve a run.
TASK_SETTINGS = ("task", "task_type", "positive_class", "input_size", "resize", "percentiles", "nifti_modality",
                 "raster_modality", "val_fraction", "test_fraction", "split_seed", "skip_bad", "paths_outside_csv")


@dataclass
class Task:
    """A task ready for training: parsed rows, their split, and every image decoded once."""

    table: TaskTable
    split: np.ndarray                 # (N,) train | val | test
    split_origin: dict[str, str]      # val/test -> csv | carved
    images: Tensor                    # (N, S, S) float32: CT in HU, others in [0, 1]
    is_ct: Tensor                     # (N,) bool
    settings: dict                    # the TASK_SETTINGS it was prepared with
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of rows left out (skip_bad)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def summary(self) -> dict:
        t = self.table
        return {"csv": str(t.csv), "type": t.kind, "classes": t.classes, "outputs": t.outputs,
                "images": {s: int(np.sum(self.split == s)) for s in SPLITS},
                "split_origin": self.split_origin, "skipped": self.skipped}


def task_settings(cfg: FinetuneConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k in TASK_SETTINGS}


def check_task(task: Task, cfg: FinetuneConfig) -> None:
    """A prepared task can serve only runs with the image and split settings it was made with."""
    wanted = task_settings(cfg)
    differ = [f"{k}: task prepared with {task.settings[k]!r}, config has {wanted[k]!r}"
              for k in wanted if task.settings[k] != wanted[k]]
    if differ:
        raise ConfigError("the prepared task does not match the settings:\n  " + "\n  ".join(differ))


def _check_evaluable(table: TaskTable, split: np.ndarray) -> None:
    """Validation and test need, for at least one output, both positives and negatives (else no AUC)."""
    for name in ("val", "test"):
        targets = table.targets[split == name]
        if not np.any((targets.min(0) == 0) & (targets.max(0) == 1)):
            raise TaskError(f"{table.csv}: the {name} split ({len(targets)} images) has no output with both "
                            f"positive and negative images, so no AUC can be computed; put images of every "
                            f"class in it, or drop the split column to let val and test be carved out")


def load_task(cfg: FinetuneConfig, show_progress: bool = False) -> Task:
    """Read the CSV, decode every image, drop (``skip_bad``) or report unusable ones, assign splits."""
    if cfg.task is None:
        raise TaskError("no task CSV given (--task TASK.csv)")
    table = read_task_csv(cfg.task, cfg.task_type, cfg.positive_class, cfg.paths_outside_csv)
    images, is_ct, failures = load_images(table.csv.parent, table.paths, cfg, show_progress)
    skipped = [{"path": table.paths[i], "reason": reason} for i, reason in failures]
    if failures and not cfg.skip_bad:
        lines = [f"{s['path']}: {s['reason']}" for s in skipped]
        raise TaskError(f"{len(failures)} of {len(table)} images of {table.csv} cannot be used:\n{_listing(lines)}\n"
                        "Fix or remove these rows, or pass --skip-bad (skip_bad=true) to leave them out.")
    if failures:
        keep = np.setdiff1d(np.arange(len(table)), [i for i, _ in failures])
        if len(keep) == 0:
            raise TaskError(f"none of the {len(table)} images of {table.csv} can be used, e.g. "
                            f"{skipped[0]['path']}: {skipped[0]['reason']}")
        table, images, is_ct = table.subset(keep), images[keep], is_ct[keep]
    split, origin = assign_splits(table, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    _check_evaluable(table, split)
    return Task(table=table, split=split, split_origin=origin, images=images, is_ct=is_ct,
                settings=task_settings(cfg), skipped=skipped)
