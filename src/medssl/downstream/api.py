"""The Python API of downstream training, mirroring ``medssl finetune`` (for notebooks and ``bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.config import ConfigError, FinetuneConfig, load_config
from medssl.downstream.tasks import Task, load_task
from medssl.downstream.training import run_finetune


def check_out(out: Path, kind: str, name: str = "out") -> None:
    """A clear error before any work, not a traceback after it: ``out`` names the ``kind`` ("folder" or
    "file") to write, so it must not be the other kind, and what exists above it must be folders.
    ``name``: how the caller calls it in the message (the CLI: ``--out``)."""
    if out.exists() and out.is_dir() != (kind == "folder"):
        raise ConfigError(f"{name} {out} is {'a folder' if out.is_dir() else 'a file'}; name the {kind} to write")
    existing = next((p for p in out.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{name} {out}: {existing} is a file, not a folder")


def finetune(task: str | Path | Task, *, config: str | Path | None = None, show_progress: bool = False,
             **settings: Any) -> dict:
    """Train and evaluate one run; returns the metrics (``artifacts.DownstreamMetrics``) written to
    ``<out>/metrics.json``, as a dict.

    ``task``: a task CSV, or a ``Task`` from ``prepare_task`` (decodes the images once for many runs); a
    prepared task's image and split settings are taken as given, and keyword arguments must agree with them.
    ``config``: a YAML file of settings; ``settings``: any ``FinetuneConfig`` field, e.g.
    ``finetune("task.csv", init="runs/ct", mode="hybrid", label_fraction=0.1, seed=0, out="results/h")``.
    """
    prepared = task if isinstance(task, Task) else None
    # A prepared task's image and split settings are the defaults: only training settings need passing.
    flags = {**prepared.settings, **settings} if prepared is not None else {**settings, "task": Path(task)}
    cfg = load_config(FinetuneConfig, Path(config) if config else None, flags)
    if cfg.out is not None:  # before any image is decoded (run_finetune refuses a missing out)
        check_out(Path(cfg.out), "folder")
    return run_finetune(cfg, prepared, show_progress).model_dump()


def prepare_task(task: str | Path, *, config: str | Path | None = None, show_progress: bool = False,
                 **settings: Any) -> Task:
    """Read a task CSV and decode its images once, for several ``finetune`` calls with the same image settings."""
    cfg = load_config(FinetuneConfig, Path(config) if config else None, {**settings, "task": Path(task)})
    return load_task(cfg, show_progress)
