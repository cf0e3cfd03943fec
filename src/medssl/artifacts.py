"""The files between stages, by name: what each stage writes into its folder and the next one reads.

One place for the layout, so that a writer and its readers cannot drift apart (``"metrics.json"`` was a
literal in seven modules). A dataset (``medssl ingest``, ``medssl curate``): ``INDEX`` (its shards and
sample counts), ``REPORT`` (counts by status, modality, format), ``manifest/``, ``shards/``. A pretraining
run: ``CARD`` and the encoder (``models.export``), ``METRICS_LOG`` (a line per logged step),
``CHECKPOINT`` (what a resume reads), ``SNAPSHOTS``/step-NNNNNN/ (run folders of their own). A downstream
run: ``METRICS``, ``PREDICTIONS``, ``BEST`` (the chosen classifier), ``ROBUSTNESS``. A bench: ``RESULTS``.
"""

from __future__ import annotations

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
