"""A setting chosen on validation inside one run: ``ssl_weight: auto`` (hybrid) and ``probe_lrs`` (linear).

Each value is trained as an ordinary run in ``<out>/sweep/<setting>-<value>/``; the one with the best
validation AUC (the first on a tie) becomes the run's result: its ``best.pt`` and test predictions are
moved to ``<out>``, and ``metrics.json`` is its metrics plus ``sweep`` (every value's validation AUC and
the one chosen) and the run's own config. The other values' ``best.pt`` are deleted: a classifier holds
the whole encoder (45 MB for a ResNet-18), and a bench runs hundreds of sweeps. Their metrics.json stay,
for the record and to resume. Test scores play no part in the choice. A value whose run diverged before
any evaluation is recorded and skipped. Rerunning resumes: a finished sweep returns its metrics, and a
value whose folder holds the results of its exact settings is not trained again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medssl.artifacts import BEST, METRICS, DownstreamMetrics, RecordError, TrainingDiverged
from medssl.config import FinetuneConfig, dump_config

SWEEP = "sweep"


def sweep_of(cfg: FinetuneConfig) -> tuple[str, list[float]] | None:
    """(setting, values) that this run chooses on validation, or None."""
    if cfg.mode == "hybrid" and cfg.ssl_weight == "auto":
        return "ssl_weight", list(cfg.ssl_weight_grid)
    if cfg.mode == "linear" and cfg.probe_lrs:
        return "head_lr", list(cfg.probe_lrs)
    return None


def finished(cfg: FinetuneConfig) -> DownstreamMetrics | None:
    """The metrics in ``cfg.out`` if they are the results of exactly these settings (to resume), else None
    (also for a metrics.json of another version: the run is done again)."""
    try:
        metrics = DownstreamMetrics.read(Path(cfg.out) / METRICS)
    except (OSError, RecordError):
        return None
    return metrics if metrics.config == dump_config(cfg) else None


def run_sweep(cfg: FinetuneConfig, setting: str, values: list[float],
              run_one: Callable[[FinetuneConfig], DownstreamMetrics]) -> DownstreamMetrics:
    out = Path(cfg.out)
    done = finished(cfg)
    if done is not None:
        return done
    tried, results = [], {}
    for value in values:
        sub = cfg.model_copy(update={setting: value, "probe_lrs": [], "out": out / SWEEP / f"{setting}-{value:g}"})
        try:
            metrics = finished(sub) or run_one(sub)
        except TrainingDiverged as e:
            tried.append({"value": value, "best_val_auc": None, "error": str(e)})
            continue
        results[value] = metrics
        tried.append({"value": value, "best_val_auc": metrics.best_val_auc})
    scored = [t for t in tried if t["best_val_auc"] is not None]
    if not scored:
        raise TrainingDiverged(f"every {setting} tried ({', '.join(f'{v:g}' for v in values)}) diverged before a "
                               f"validation AUC; at {values[0]:g}: {tried[0]['error']}")
    chosen = max(scored, key=lambda t: t["best_val_auc"])["value"]  # max keeps the first of equals
    metrics = results[chosen]
    for value in results:
        folder = out / SWEEP / f"{setting}-{value:g}"
        for name in metrics.files.values():
            if value == chosen and (folder / name).exists():
                (folder / name).replace(out / name)  # a rename: atomic, and no second copy on disk
            elif value != chosen and name == BEST:
                (folder / name).unlink(missing_ok=True)
        if value == chosen:  # moved here by this call or by an attempt cut short before metrics.json
            missing = [n for n in metrics.files.values() if not (out / n).exists()]
            if missing:
                raise FileNotFoundError(f"{folder}: {', '.join(missing)} missing; delete {folder} to redo it")
    metrics = metrics.model_copy(update={"sweep": {"setting": setting, "chosen": chosen, "tried": tried},
                                         "config": dump_config(cfg)})
    metrics.write(out / METRICS)
    return metrics
