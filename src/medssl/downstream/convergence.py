"""Convergence: how many training steps a run needs to reach a validation AUC.

Ghesu et al. 2022 report convergence up to 85% faster from self-supervised initialisation. We
measure it as the first evaluated step whose validation AUC reaches a target: a number given
(``target_auc``) or the best validation AUC of another run (``target_from``, e.g. the scratch run),
so "steps saved" = 1 - steps_to_target(SSL) / steps_to_target(scratch) at the scratch run's best.
Evaluations happen once per epoch, so the count is exact to within one epoch of steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from medssl.artifacts import METRICS
from medssl.config import ConfigError


def best_val_auc(run_dir: Path) -> float:
    """The best validation AUC in another finetune output folder's metrics.json."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise ConfigError(f"target_from: {path} does not exist; give the output folder of a finished `medssl finetune`")
    values = [h["val_auc"] for h in json.loads(path.read_text()).get("history", []) if h.get("val_auc") is not None]
    if not values:
        raise ConfigError(f"target_from: {path} has no validation AUC in its history")
    return max(values)


def steps_to_target(history: list[dict], target: float) -> int | None:
    """First evaluated step whose ``val_auc`` >= target; None if the run never got there."""
    return next((h["step"] for h in history if h["val_auc"] is not None and h["val_auc"] >= target), None)
