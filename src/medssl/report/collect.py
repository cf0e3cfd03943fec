"""Find the artefacts under a folder and read them: ingest outputs, pretraining runs, downstream runs.

A folder is recognised by the files it holds, never by its name:

- ingest output: ``report.json`` and ``index.json`` (``medssl ingest``)
- pretraining run: ``model_card.json`` or ``metrics.jsonl`` (``medssl pretrain``)
- downstream run: ``metrics.json`` with ``test_auc`` or ``history`` (``medssl finetune``)
- bench: ``results.json`` with ``rows`` in the folder itself (``medssl bench``, ``medssl demo``)

The folder itself and its sub-folders down to ``DEPTH`` levels are searched, so a demo or bench
folder holding ``shards/``, ``pretrain/`` and ``finetune-*/`` gives one report. Anything missing or
unreadable becomes a note (a line in the report) instead of an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from medssl.artifacts import CARD, METRICS, METRICS_LOG, RESULTS, ROBUSTNESS, SNAPSHOTS
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
    index: dict


@dataclass
class PretrainRun:
    path: Path
    name: str
    card: dict | None          # None when the run has not finished (no model_card.json yet)
    metrics: list[dict]        # one record per logged step, later lines win (a resumed run logs again)
    has_encoder: bool


@dataclass
class DownstreamRun:
    path: Path
    name: str
    metrics: dict
    predictions: Curves | None
    robustness: dict | None

    @property
    def test_auc(self) -> float | None:
        value = self.metrics.get("test_auc")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def test_auc_ci(self) -> tuple[float, float] | None:
        ci = self.metrics.get("test_auc_ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
            return float(ci[0]), float(ci[1])
        return None

    @property
    def init(self) -> str:
        """``scratch``, or the pretraining run folder the encoder came from."""
        init = self.metrics.get("init", self.metrics.get("config", {}).get("init", "scratch"))
        return str(init.get("init", "scratch") if isinstance(init, dict) else init)

    @property
    def init_kind(self) -> str:
        return "scratch" if self.init == "scratch" else "SSL"

    @property
    def mode(self) -> str:
        return str(self._setting("mode", "finetune"))

    @property
    def label_fraction(self) -> float:
        return float(self._setting("label_fraction", 1.0))

    @property
    def task(self) -> str:
        """The task CSV's path, which groups runs that can be compared."""
        task = self.metrics.get("task")
        if isinstance(task, dict) and task.get("csv"):
            return str(task["csv"])
        return str(self.metrics.get("config", {}).get("task") or "task")

    def _setting(self, key: str, default):
        value = self.metrics.get(key)
        return value if value is not None else self.metrics.get("config", {}).get(key, default)


@dataclass
class Artefacts:
    root: Path
    ingests: list[IngestOutput] = field(default_factory=list)
    pretrains: list[PretrainRun] = field(default_factory=list)
    downstreams: list[DownstreamRun] = field(default_factory=list)
    bench: dict | None = None   # results.json of `medssl bench` / `medssl demo` in the folder itself
    notes: list[str] = field(default_factory=list)   # what was unreadable, for the report's overview


def find_artefacts(root: Path) -> Artefacts:
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder: pass an ingest output, a pretraining run, a downstream run "
                          "or a folder holding several")
    found = Artefacts(root=root)
    if (root / RESULTS).is_file():
        try:
            results = _json(root / RESULTS)
            found.bench = results if "rows" in results else None
        except (OSError, ValueError) as e:
            found.notes.append(f"{root / RESULTS}: skipped, could not be read ({e})")
    for folder in _folders(root):
        name = folder.relative_to(root).as_posix() if folder != root else root.resolve().name
        if (folder / "report.json").is_file() and (folder / "index.json").is_file():
            _add(found, folder, lambda: IngestOutput(folder, name, _json(folder / "report.json"),
                                                     _json(folder / "index.json")), found.ingests)
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
    return PretrainRun(folder, name, _json(card) if card.is_file() else None,
                       [by_step[s] for s in sorted(by_step)], (folder / "encoder.safetensors").is_file())


def _downstream_run(folder: Path, name: str, notes: list[str]) -> DownstreamRun | None:
    metrics = _json(folder / METRICS)
    if "test_auc" not in metrics and "history" not in metrics:
        return None  # some other tool's metrics.json
    predictions = None
    for file in PREDICTION_FILES:
        if (folder / file).is_file():
            try:
                predictions = read_predictions(folder / file)
            except (OSError, ValueError) as e:
                notes.append(f"{folder / file}: not used for ROC curves ({e})")
            break
    robustness = _json(folder / ROBUSTNESS) if (folder / ROBUSTNESS).is_file() else None
    return DownstreamRun(folder, name, metrics, predictions, robustness)
