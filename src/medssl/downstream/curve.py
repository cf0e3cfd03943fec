"""How pretraining length pays off: the frozen probes (kNN, linear) on every saved encoder of one run.

A pretraining run with ``snapshot_every`` keeps its encoder at steps N, 2N, ... in ``snapshots/``; each is
scored on a task with the cheap frozen-encoder protocols, as is the randomly initialised encoder (step 0)
and the final one. The encoder's features are computed once per checkpoint and shared by both probes,
every label fraction and seed. Each point is a finetune folder, ``<out>/step-NNNNNN/<mode>-f<fraction>-s<seed>/``,
without its ``best.pt`` (a linear probe's classifier holds the whole encoder: 45 MB for a ResNet-18, times
a hundred points), so a rerun resumes from the metrics; ``curve.json`` lists the points
and ``pretraining-length.png`` draws test AUC (mean over seeds) against pretraining steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medssl import storage
from medssl.artifacts import BEST, CARD, SNAPSHOTS
from medssl.atomic import atomic_open, atomic_write_text
from medssl.config import FinetuneConfig
from medssl.downstream.probes import encoder_features
from medssl.downstream.sweep import finished
from medssl.downstream.tasks import Task
from medssl.downstream.training import run_finetune
from medssl.models.export import read_card

CURVE = "curve.json"
PLOT = "pretraining-length.png"
PROBE_MODES = ("knn", "linear")


def checkpoints(run: str | Path) -> list[tuple[int, str]]:
    """(pretraining step, init) of a run: its random start ("scratch"), its snapshots and its final encoder."""
    found = {0: "scratch"}
    folder = storage.join(run, SNAPSHOTS)
    if storage.exists(folder):
        for name in storage.listdir(folder):
            snapshot = storage.join(folder, name)
            if name.startswith("step-") and storage.exists(storage.join(snapshot, CARD)):
                found[read_card(snapshot).steps] = str(snapshot)
    found[read_card(run).steps] = str(run)  # the final encoder, also where it is no multiple of snapshot_every
    return sorted(found.items())


def probe_curve(run: str | Path, task: Task, out: Path, fractions: list[float], seeds: list[int],
                settings: dict[str, Any], name: str | None = None, show_progress: bool = True) -> dict:
    """Score every checkpoint of ``run`` with kNN and a linear probe; writes and returns ``curve.json``.

    ``settings``: FinetuneConfig settings of the probes (e.g. epochs, probe_lrs); ``name``: the task's name
    in the figure (default: the CSV's file name)."""
    card = read_card(run)
    points = []
    todo = checkpoints(run)
    bar = tqdm(total=len(todo), desc="probing checkpoints", unit="ckpt", disable=not show_progress)
    for step, init in todo:
        features = None
        for mode in PROBE_MODES:
            for fraction in fractions:
                for seed in seeds:
                    cfg = FinetuneConfig.model_validate({
                        **task.settings, **settings, "init": init, "backbone": card.architecture, "mode": mode,
                        "label_fraction": fraction, "seed": seed,
                        "out": out / f"step-{step:06d}" / f"{mode}-f{fraction:g}-s{seed}"})
                    metrics = finished(cfg)
                    if metrics is None:
                        if features is None:  # once per checkpoint, only if some point needs it
                            features = encoder_features(cfg, task)
                        metrics = run_finetune(cfg, task, False, features)
                        (cfg.out / BEST).unlink(missing_ok=True)  # a point is a number; see the module doc
                    points.append({"step": step, "mode": mode, "label_fraction": fraction, "seed": seed,
                                   "val_auc": metrics.best_val_auc, "test_auc": metrics.test_auc})
        bar.update(1)
    bar.close()
    curve = {"run": str(run), "architecture": card.architecture, "task": name or Path(task.settings["task"]).stem,
             "points": points}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CURVE, json.dumps(curve, indent=1))
    plot_curve(curve, out / PLOT)
    return curve


def mean_curves(points: list[dict]) -> dict[tuple[str, float], list[tuple[int, float]]]:
    """(mode, label fraction) -> [(step, mean test AUC over seeds)], points without a test AUC left out."""
    by_line: dict[tuple[str, float], dict[int, list[float]]] = {}
    for p in points:
        if p["test_auc"] is not None:
            by_line.setdefault((p["mode"], p["label_fraction"]), {}).setdefault(p["step"], []).append(p["test_auc"])
    return {line: [(step, float(np.mean(v))) for step, v in sorted(steps.items())] for line, steps in by_line.items()}


def plot_curve(curve: dict, path: Path) -> Path:
    from medssl.figures import panel_figure  # matplotlib only when drawing

    fig, (ax,) = panel_figure(1, height=4.0, width=7.0)
    lines = mean_curves(curve["points"])
    fractions = sorted({fraction for _, fraction in lines})
    colours = {f: f"C{i}" for i, f in enumerate(fractions)}  # one colour per label fraction, one dash per probe
    for (mode, fraction), line in sorted(lines.items()):
        ax.plot(*zip(*line), marker="o", color=colours[fraction], linestyle="-" if mode == "linear" else "--",
                label=f"{mode}, {fraction:g} of the labels")
    ax.set_xlabel("pretraining step (0: random initialisation)")
    ax.set_ylabel("test AUC (mean over seeds)")
    ax.set_title(f"{curve['task']}: frozen probes along pretraining")
    ax.legend(fontsize=8)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    return path
