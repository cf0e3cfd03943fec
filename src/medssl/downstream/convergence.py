"""Convergence: how many training steps a run needs to reach a validation AUC.

Ghesu et al. 2022 report convergence up to 85% faster from self-supervised initialisation. We
measure it as the first evaluated step whose validation AUC reaches a target: a number given
(``target_auc``) or the best validation AUC of another run (``target_from``, e.g. the scratch run),
so "steps saved" = 1 - steps_to_target(SSL) / steps_to_target(scratch) at the scratch run's best.
Evaluations happen once per epoch, so the count is exact to within one epoch of steps.
"""

from __future__ import annotations

from pathlib import Path

from medssl.artifacts import METRICS, DownstreamMetrics, RecordError
from medssl.config import ConfigError


def best_val_auc(run_dir: Path) -> float:
    """The best validation AUC in another finetune output folder's metrics.json."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise ConfigError(f"target_from: {path} does not exist; give the output folder of a finished `medssl finetune`")
    try:
        values = [auc for _, auc in DownstreamMetrics.read(path).val_curve()]
    except RecordError as e:
        raise ConfigError(f"target_from: {e}") from None
    if not values:
        raise ConfigError(f"target_from: {path} has no validation AUC in its history")
    return max(values)


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """First step of a (step, validation AUC) curve whose AUC >= target; None if the run never got there."""
    return next((step for step, auc in curve if auc >= target), None)
