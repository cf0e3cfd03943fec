"""The files between stages: their names, and the records they hold as typed, versioned models.

One place for the layout, so that a writer and its readers cannot drift apart (``"metrics.json"`` was a
literal in seven modules, read by two readers that disagreed on what it held). A dataset (``medssl
ingest``, ``medssl curate``): ``INDEX`` (its shards and sample counts, ``DatasetIndex``), ``REPORT`` (counts
by status, modality, format), ``manifest/``, ``shards/``. A pretraining run: ``CARD`` (``ModelCard``) and
the encoder (``models.export``), ``METRICS_LOG`` (a line per logged step), ``CHECKPOINT`` (what a resume
reads), ``SNAPSHOTS``/step-NNNNNN/ (run folders of their own). A downstream run: ``METRICS``
(``DownstreamMetrics``), ``PREDICTIONS``, ``BEST`` (the chosen classifier), ``ROBUSTNESS``
(``RobustnessReport``); ``read_downstream`` reads a run folder for the bench and the report alike. A bench:
``RESULTS`` (``BenchResults``).

Every record carries ``format`` (kind/version). A file of another version is refused with one line naming
it and both versions; a file of this version written before the field existed reads as this version.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medssl import storage
from medssl.atomic import atomic_write_text

INDEX = "index.json"
REPORT = "report.json"

CARD = "model_card.json"
METRICS_LOG = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SNAPSHOTS = "snapshots"

METRICS = "metrics.json"
PREDICTIONS = "test_predictions.csv"
BEST = "best.pt"
ROBUSTNESS = "robustness.json"

RESULTS = "results.json"


class TrainingDiverged(RuntimeError):
    """Training cannot go on: pretraining after ``max_bad_steps`` consecutive non-finite losses, a
    fine-tune when it diverged before any evaluation gave a validation AUC (no result to report)."""


class RecordError(ValueError):
    """A stage's file that cannot be read as its record: another version, not JSON, or fields that do not fit."""


R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """A file between stages. ``FORMAT`` is "kind/version"; bump the version when a field changes meaning."""
    model_config = ConfigDict(extra="forbid")
    FORMAT: ClassVar[str]
    format: str = ""

    def model_post_init(self, context: Any) -> None:
        self.format = self.format or self.FORMAT

    @classmethod
    def parse(cls: type[R], text: str, where: str | Path) -> R:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise RecordError(f"{where}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise RecordError(f"{where}: not a JSON object, so not a {cls.FORMAT} record")
        found = data.get("format") or cls.FORMAT  # written before records carried a version: this one
        if found != cls.FORMAT:
            raise RecordError(f"{where} is a {found} record; this medssl reads {cls.FORMAT} (written by another "
                              "medssl version: rerun the stage that wrote it, or read it with that version)")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(map(str, first["loc"])) or "(top level)"
            raise RecordError(f"{where}: not a valid {cls.FORMAT} record: {field}: {first['msg']} "
                              f"({e.error_count()} problem(s))") from None

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """The record in ``path`` (local or a URL); FileNotFoundError when it is absent."""
        return cls.parse(storage.read_text(path), path)

    def text(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1)

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, self.text())


class _Open(BaseModel):
    """A part of a record that other tools may extend: unknown keys are kept."""
    model_config = ConfigDict(extra="allow")


# --- a dataset ---------------------------------------------------------------------------------------------

class IndexShard(_Open):
    name: str
    samples: int


class DatasetIndex(Record):
    """index.json of an ingest or curate output: its shards in reading order. Ingest writes it a shard per
    line (``ingest.report``), so that it diffs and greps well; its content is this record."""
    FORMAT: ClassVar[str] = "medssl-shards/1"
    samples: int
    shards: list[IndexShard]


def read_index(dataset: str | Path) -> DatasetIndex:
    """The index.json of a dataset folder (local or a URL)."""
    return DatasetIndex.read(storage.join(dataset, INDEX))


# --- a pretraining run -------------------------------------------------------------------------------------

class DataSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shard_folders: list[str]
    samples: int
    by_modality: dict[str, int]
    shard_locations: list[dict[str, str]] = Field(default_factory=list)  # since medssl 0.7 (export locations)


class ModelCard(Record):
    """model_card.json beside a run's encoder: what is needed to use it without the training code's config."""
    FORMAT: ClassVar[str] = "medssl-card/1"
    intensity: str
    architecture: str
    in_chans: int
    feature_dim: int
    input_size: int
    steps: int
    medssl_version: str | None = None
    config: dict[str, Any]
    data: DataSummary


# --- a downstream run --------------------------------------------------------------------------------------

class Evaluation(BaseModel):
    """One validation pass of a fine-tune (kNN: the single one, at step 0)."""
    model_config = ConfigDict(extra="forbid")
    epoch: int
    step: int
    val_auc: float | None
    train_loss: float | None = None
    train_sup_loss: float | None = None
    train_ssl_loss: float | None = None
    elapsed_s: float | None = None


class Divergence(BaseModel):
    model_config = ConfigDict(extra="forbid")
    after_step: int
    epoch: int
    what: str


class DownstreamMetrics(Record):
    """metrics.json of ``medssl finetune`` / ``probe`` (and of each value of a validation sweep)."""
    FORMAT: ClassVar[str] = "medssl-metrics/1"
    test_auc: float | None
    test_auc_ci: list[float] | None
    test_auc_per_label: dict[str, float | None]
    test_auc_per_label_ci: dict[str, list[float] | None]
    test_accuracy: float | None
    best_val_auc: float
    best_epoch: int
    best_step: int
    target_auc: float | None
    steps_to_target: int | None
    steps: int
    epochs: int
    stopped_early: bool
    status: Literal["completed", "diverged"]
    diverged: Divergence | None
    train_seconds: float
    history: list[Evaluation]
    ssl_scale_factor: float | None = None       # fine-tunes (1 where no SSL term)
    knn: dict[str, float] | None = None         # kNN probes: k and temperature
    files: dict[str, str]                       # what else the run folder holds: checkpoint, predictions
    sweep: dict[str, Any] | None = None         # a sweep's choice on validation, and what it tried
    mode: str
    init: dict[str, Any]
    label_fraction: float
    seed: int
    task: dict[str, Any]
    bootstrap_resamples: int
    device: str
    medssl_version: str
    config: dict[str, Any]

    def val_curve(self) -> list[tuple[int, float]]:
        """(step, validation AUC) of the evaluations that gave one."""
        return [(h.step, h.val_auc) for h in self.history if h.val_auc is not None]


class LevelScore(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: float
    auc: float | None
    drop: float | None
    drop_ci: list[float] | None = None


class RobustnessReport(Record):
    """robustness.json of ``medssl evaluate``: the test AUC under each perturbation sweep."""
    FORMAT: ClassVar[str] = "medssl-robustness/1"
    clean_auc: float
    sweeps: dict[str, list[LevelScore]]
    worst: dict[str, LevelScore]
    test_images: int
    split: str
    task: str
    run: str
    skipped: dict[str, str]
    seed: int


@dataclass
class DownstreamResult:
    """A finished downstream run as the bench and the report read it: its metrics and, when it was
    evaluated, its robustness."""
    path: Path
    metrics: DownstreamMetrics
    robustness: RobustnessReport | None

    @property
    def test_auc(self) -> float | None:
        value = self.metrics.test_auc
        return value if value is not None and math.isfinite(value) else None

    @property
    def init(self) -> str:
        """``scratch``, or where the encoder's weights came from (a pretraining run folder, a weights file)."""
        return str(self.metrics.init.get("init", "scratch"))

    @property
    def init_kind(self) -> str:
        """``scratch`` or ``SSL`` (pretrained weights of any source)."""
        return "scratch" if self.init == "scratch" else "SSL"

    @property
    def task(self) -> str:
        """The task CSV's path, which groups runs that can be compared."""
        return str(self.metrics.task.get("csv") or self.metrics.config.get("task") or "task")


def is_downstream(folder: str | Path) -> bool:
    return (Path(folder) / METRICS).is_file()


def read_downstream(folder: str | Path) -> DownstreamResult:
    """The run in ``folder`` (RecordError for a metrics.json of another kind or version)."""
    folder = Path(folder)
    robustness = folder / ROBUSTNESS
    return DownstreamResult(folder, DownstreamMetrics.read(folder / METRICS),
                            RobustnessReport.read(robustness) if robustness.is_file() else None)


# --- a bench -----------------------------------------------------------------------------------------------

class BenchResults(Record):
    """results.json of ``medssl bench`` / ``medssl demo``. Its rows are the summary tables' rows
    (``bench.results.summarise``), one per task, arm and label fraction."""
    FORMAT: ClassVar[str] = "medssl-bench/1"
    name: str
    command: str
    machine: dict[str, Any]
    pool: dict[str, Any] | None
    pretrain: dict[str, Any] | None
    runs: dict[str, int]
    failures: list[dict[str, str]]
    notes: list[str]
    rows: list[dict[str, Any]]
    curves: dict[str, list[dict[str, Any]]]
    config: dict[str, Any]
    seconds: dict[str, float] = Field(default_factory=dict)
    plots: list[str] = Field(default_factory=list)
