"""The Python API of downstream training, mirroring ``medssl finetune`` (for notebooks and ``bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.config import FinetuneConfig, load_config
from medssl.downstream.tasks import Task, load_task
from medssl.downstream.training import run_finetune


def finetune(task: str | Path | Task, *, config: str | Path | None = None, show_progress: bool = False,
             **settings: Any) -> dict:
    """Train and evaluate one run; returns the metrics dict also written to ``<out>/metrics.json``.

    ``task``: a task CSV, or a ``Task`` from ``prepare_task`` (decodes the images once for many runs); a
    prepared task's image and split settings are taken as given, and keyword arguments must agree with them.
    ``config``: a YAML file of settings; ``settings``: any ``FinetuneConfig`` field, e.g.
    ``finetune("task.csv", init="runs/ct", mode="hybrid", label_fraction=0.1, seed=0, out="results/h")``.
    """
    if isinstance(task, Task):  # its image and split settings are the defaults: only training settings need passing
        flags = {**task.settings, **settings}
        cfg = load_config(FinetuneConfig, Path(config) if config else None, flags)
        return run_finetune(cfg, task, show_progress)
    cfg = load_config(FinetuneConfig, Path(config) if config else None, {**settings, "task": Path(task)})
    return run_finetune(cfg, None, show_progress)


def prepare_task(task: str | Path, *, config: str | Path | None = None, show_progress: bool = False,
                 **settings: Any) -> Task:
    """Read a task CSV and decode its images once, for several ``finetune`` calls with the same image settings."""
    cfg = load_config(FinetuneConfig, Path(config) if config else None, {**settings, "task": Path(task)})
    return load_task(cfg, show_progress)
