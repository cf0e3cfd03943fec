"""Find the artefacts under a folder and read them: ingest outputs, pretraining runs, downstream runs.

A folder is recognised by the files it holds, never by its name:

- ingest output: ``report.json`` and ``index.json`` (``medssl ingest``)
- pretraining run: ``model_card.json`` or ``metrics.jsonl`` (``medssl pretrain``)
- downstream run: ``metrics.json`` (``medssl finetune``)
- bench: ``results.json`` in the folder itself (``medssl bench``, ``medssl demo``)

Each is read through its record in ``medssl.artifacts``. A file of another tool under one of these names
(no ``format``, none of our keys) is passed over.

The folder itself and its sub-folders down to ``DEPTH`` levels are searched, so a demo or bench
folder holding ``shards/``, ``pretrain/`` and ``finetune-*/`` gives one report. Anything missing or
unreadable becomes a note (a line in the report) instead of an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from medssl.artifacts import (
    CARD,
    INDEX,
    METRICS,
    METRICS_LOG,
    RESULTS,
    SNAPSHOTS,
    BenchResults,
    DatasetIndex,
    DownstreamResult,
    ModelCard,
    read_downstream,
    read_index,
)
from medssl.downstream.sweep import SWEEP
from medssl.report.predictions import PREDICTION_FILES, Curves, read_predictions

DEPTH = 2
NOT_SEARCHED = ("tensorboard", SNAPSHOTS, SWEEP)


class ReportError(RuntimeError):
    """The folder cannot be reported on (absent, or holds no artefact)."""


@dataclass
class IngestOutput:
    path: Path
    name: str
    report: dict
    index: DatasetIndex


@dataclass
class PretrainRun:
    path: Path
    name: str
    card: ModelCard | None     # None when the run has not finished (no model_card.json yet)
    metrics: list[dict]        # one record per logged step, later lines win (a resumed run logs again)
    has_encoder: bool


@dataclass
class DownstreamRun(DownstreamResult):
    """A downstream run as the report shows it: what ``artifacts.read_downstream`` reads, its name in the
    report, and its test predictions for the ROC curves."""
    name: str = ""
    predictions: Curves | None = None

    @property
    def test_auc_ci(self) -> tuple[float, float] | None:
        ci = self.metrics.test_auc_ci
        return (ci[0], ci[1]) if ci is not None and len(ci) == 2 else None

    @property
    def mode(self) -> str:
        return self.metrics.mode

    @property
    def label_fraction(self) -> float:
        return self.metrics.label_fraction


@dataclass
class Artefacts:
    root: Path
    ingests: list[IngestOutput] = field(default_factory=list)
    pretrains: list[PretrainRun] = field(default_factory=list)
    downstreams: list[DownstreamRun] = field(default_factory=list)
    bench: dict | None = None   # results.json (BenchResults, as the bench's tables take it) in the folder itself
    notes: list[str] = field(default_factory=list)   # what was unreadable, for the report's overview


def find_artefacts(root: Path) -> Artefacts:
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder: pass an ingest output, a pretraining run, a downstream run "
                          "or a folder holding several")
    found = Artefacts(root=root)
    if (root / RESULTS).is_file():
        try:
            found.bench = None if _foreign(root / RESULTS, "rows") else BenchResults.read(root / RESULTS).model_dump()
        except (OSError, ValueError) as e:
            found.notes.append(f"{root / RESULTS}: skipped, could not be read ({e})")
    for folder in _folders(root):
        name = folder.relative_to(root).as_posix() if folder != root else root.resolve().name
        if (folder / "report.json").is_file() and (folder / INDEX).is_file():
            _add(found, folder, lambda: IngestOutput(folder, name, _json(folder / "report.json"), read_index(folder)),
                 found.ingests)
        if (folder / CARD).is_file() or (folder / METRICS_LOG).is_file():
            _add(found, folder, lambda: _pretrain_run(folder, name), found.pretrains)
        if (folder / METRICS).is_file():
            _add(found, folder, lambda: _downstream_run(folder, name, found.notes), found.downstreams)
    if not (found.ingests or found.pretrains or found.downstreams):
        raise ReportError(
            f"{root} holds no medssl artefact (searched {DEPTH} folder levels down): expected an ingest output "
            "(report.json + index.json), a pretraining run (model_card.json, metrics.jsonl) or a downstream "
            "run (metrics.json)" + ("; " + "; ".join(found.notes) if found.notes else ""))
    return found


def _folders(root: Path) -> list[Path]:
    """root and its sub-folders down to DEPTH levels, sorted. Hidden folders, TensorBoard logs, the inside
    of ingest outputs (whose shards/ may hold 100 000 files) and the parts of a run (a pretraining run's
    snapshots/, the per-value runs of a finetune's sweep/, whose chosen one the run reports) are not searched."""
    level, folders = [root], [root]
    for _ in range(DEPTH):
        parents = [p for p in level if not (p / "index.json").is_file()]
        level = sorted(p for parent in parents for p in parent.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_SEARCHED)
        folders += level
    return folders


def _add(found: Artefacts, folder: Path, read, into: list) -> None:
    try:
        artefact = read()
    except (OSError, ValueError, KeyError, TypeError) as e:
        found.notes.append(f"{folder}: skipped, could not be read ({type(e).__name__}: {e})")
        return
    if artefact is not None:
        into.append(artefact)


def _json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _pretrain_run(folder: Path, name: str) -> PretrainRun:
    by_step: dict[int, dict] = {}
    jsonl = folder / METRICS_LOG
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            # Event lines (e.g. a skipped non-finite step) carry no loss; they are not curve points.
            if isinstance(record.get("loss"), (int, float)) and "step" in record:
                by_step[int(record["step"])] = record
    card = folder / CARD
    return PretrainRun(folder, name, ModelCard.read(card) if card.is_file() else None,
                       [by_step[s] for s in sorted(by_step)], (folder / "encoder.safetensors").is_file())


def _foreign(path: Path, *ours: str) -> bool:
    """A file of some other tool under one of our names: no version field and none of our keys."""
    data = _json(path)
    return "format" not in data and not any(key in data for key in ours)


def _downstream_run(folder: Path, name: str, notes: list[str]) -> DownstreamRun | None:
    if _foreign(folder / METRICS, "test_auc", "history"):
        return None
    run = read_downstream(folder)
    predictions = None
    for file in PREDICTION_FILES:
        if (folder / file).is_file():
            try:
                predictions = read_predictions(folder / file)
            except (OSError, ValueError) as e:
                notes.append(f"{folder / file}: not used for ROC curves ({e})")
            break
    return DownstreamRun(run.path, run.metrics, run.robustness, name, predictions)
