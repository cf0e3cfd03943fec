"""Test-set predictions of a downstream run, as (targets, scores) per output, for ROC curves.

Three layouts are read:

- ``medssl finetune``'s ``test_predictions.csv``: ``path, group, label, prob_<output>...`` where
  ``label`` holds class names (several joined by ``|`` for multi-label tasks); an output's target is
  1 when its name is among the row's labels (a binary task has one output, its positive class);
- ``label_<output>`` / ``score_<output>`` column pairs with 0/1 targets (multi-label);
- ``label`` / ``score`` with 0/1 targets (binary).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

PREDICTION_FILES = ("test_predictions.csv", "predictions.csv")

Curves = dict[str, tuple[np.ndarray, np.ndarray]]   # output name -> (0/1 targets, scores)


def read_predictions(path: Path) -> Curves:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError("no rows")
    columns = list(rows[0])
    probs = [c[len("prob_"):] for c in columns if c.startswith("prob_")]
    pairs = [c[len("score_"):] for c in columns if c.startswith("score_") and f"label_{c[len('score_'):]}" in columns]
    if probs and "label" in columns:
        labels = [set((r["label"] or "").split("|")) for r in rows]
        return {name: (np.array([name in row for row in labels], dtype=float),
                       _numbers(rows, f"prob_{name}")) for name in probs}
    if pairs:
        return {name: (_numbers(rows, f"label_{name}"), _numbers(rows, f"score_{name}")) for name in pairs}
    if "score" in columns and "label" in columns:
        return {"positive": (_numbers(rows, "label"), _numbers(rows, "score"))}
    raise ValueError(f"columns {columns} match no known layout (label + prob_<output>, label_<output> + "
                     "score_<output>, or label + score)")


def _numbers(rows: list[dict], column: str) -> np.ndarray:
    try:
        return np.array([float(r[column]) for r in rows])
    except (TypeError, ValueError) as e:
        raise ValueError(f"column {column} holds a non-number ({e})") from None
