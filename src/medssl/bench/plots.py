"""The bench's figures, one PNG per task and question: convergence, label efficiency, robustness.

Seeds are summarised, not hidden: thin lines or points are single runs, thick lines their mean.
Dashed: scratch arms; solid: pretrained (SSL) arms. Built on ``matplotlib.figure.Figure`` (no pyplot
global state, renders headless).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medssl.atomic import atomic_open
from medssl.bench.results import FROZEN_MODES, RunResult
from medssl.config import BenchConfig
from medssl.figures import colours_for, legend, panel_figure


def _save(fig: Figure, path: Path) -> Path:
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


def _panels(n: int, height: float = 3.8) -> tuple[Figure, list]:
    return panel_figure(n, height=height, width=max(5.0, 4.2 * min(n, 4)), columns=4)


def _style(cfg: BenchConfig, arm: str) -> dict:
    init = next(a.init for a in cfg.arms if a.name == arm)
    return {"color": colours_for([a.name for a in cfg.arms])[arm], "linestyle": "--" if init == "scratch" else "-"}


def convergence(cfg: BenchConfig, task: str, results: list[RunResult], path: Path) -> Path:
    """Validation AUC against training step, one panel per label fraction (arms that train the encoder)."""
    fractions = sorted({r.spec.label_fraction for r in results}, reverse=True)
    fig, axes = _panels(len(fractions))
    for ax, fraction in zip(axes, fractions):
        for arm in (a for a in cfg.arms if a.mode not in FROZEN_MODES):
            runs = [r for r in results if r.spec.arm == arm.name and r.spec.label_fraction == fraction]
            curves = [[(h["step"], h["val_auc"]) for h in r.metrics["history"] if h["val_auc"] is not None]
                      for r in runs]
            for curve in curves:
                ax.plot(*zip(*curve), alpha=0.25, linewidth=0.8, **_style(cfg, arm.name))
            length = min((len(c) for c in curves), default=0)
            if length:  # mean over seeds at each evaluation all of them reached
                steps = np.mean([[p[0] for p in c[:length]] for c in curves], axis=0)
                aucs = np.mean([[p[1] for p in c[:length]] for c in curves], axis=0)
                ax.plot(steps, aucs, linewidth=2, label=f"{arm.name} ({len(curves)} seeds)", **_style(cfg, arm.name))
        ax.set_title(f"{task}: {'all' if fraction == 1 else f'{fraction:g}'} of the labels")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation AUC")
        legend(ax)
    return _save(fig, path)


def label_efficiency(cfg: BenchConfig, task: str, results: list[RunResult], path: Path) -> Path:
    """Test AUC against the label fraction: each run a point, the mean over seeds a line (runs without a test
    AUC, e.g. diverged, are left out)."""
    fig, (ax,) = _panels(1, height=4.0)
    for arm in cfg.arms:
        runs = [r for r in results if r.spec.arm == arm.name and r.metrics["test_auc"] is not None]
        if not runs:
            continue
        style = _style(cfg, arm.name)
        ax.scatter([r.spec.label_fraction for r in runs], [r.metrics["test_auc"] for r in runs], color=style["color"],
                   alpha=0.5, s=14)
        fractions = sorted({r.spec.label_fraction for r in runs})
        means = [np.mean([r.metrics["test_auc"] for r in runs if r.spec.label_fraction == f]) for f in fractions]
        ax.plot(fractions, means, marker="o", label=arm.name, **style)
    fractions = sorted({r.spec.label_fraction for r in results})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training labels used")
    ax.set_ylabel("test AUC")
    ax.set_title(f"{task}: label efficiency (line: mean over seeds)")
    legend(ax)
    return _save(fig, path)


def robustness(cfg: BenchConfig, task: str, results: list[RunResult], path: Path) -> Path | None:
    """Test AUC against perturbation level, one panel per sweep, mean over seeds per arm."""
    with_sweeps = [r for r in results if r.robustness and r.robustness.get("sweeps")]
    if not with_sweeps:
        return None
    sweeps = sorted({s for r in with_sweeps for s in r.robustness["sweeps"]})
    fig, axes = _panels(len(sweeps), height=3.4)
    for ax, sweep in zip(axes, sweeps):
        for arm in cfg.arms:
            points: dict[float, list[float]] = defaultdict(list)
            for r in with_sweeps:
                if r.spec.arm == arm.name:
                    for p in r.robustness["sweeps"].get(sweep, []):
                        points[p["level"]].append(p["auc"])
            if points:
                levels = sorted(points)
                ax.plot(levels, [np.mean(points[lvl]) for lvl in levels], marker="o", markersize=3,
                        label=arm.name, **_style(cfg, arm.name))
        ax.set_title(sweep)
        ax.set_xlabel("level")
        ax.set_ylabel("test AUC")
        legend(ax, fontsize=7)
    fractions = sorted({r.spec.label_fraction for r in with_sweeps})
    sizes = sorted({r.robustness.get("test_images") for r in with_sweeps} - {None})
    fig.suptitle(f"{task}: robustness (label fraction {', '.join(f'{f:g}' for f in fractions)}; mean over seeds; "
                 f"{', '.join(map(str, sizes))} test images; each run's paired intervals are in its report)")
    return _save(fig, path)


def bench_plots(cfg: BenchConfig, results: list[RunResult], folder: Path) -> list[Path]:
    written = []
    for task in cfg.tasks:
        mine = [r for r in results if r.spec.task == task.name]
        if not mine:
            continue
        written.append(convergence(cfg, task.name, mine, folder / f"{task.name}-convergence.png"))
        if len({r.spec.label_fraction for r in mine}) > 1:
            written.append(label_efficiency(cfg, task.name, mine, folder / f"{task.name}-label-efficiency.png"))
        rob = robustness(cfg, task.name, mine, folder / f"{task.name}-robustness.png")
        if rob is not None:
            written.append(rob)
    return written
