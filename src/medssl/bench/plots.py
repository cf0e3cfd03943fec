"""The bench's figures, one PNG per task and question: convergence, label efficiency, robustness.

Drawn by ``downstream.figures`` (as the report draws them); here only which runs make a line: the seeds
of one arm, at one label fraction for convergence (a panel per fraction). Seeds are summarised, not
hidden: thin lines or points are single runs, thick lines their mean.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from medssl.atomic import atomic_open
from medssl.bench.results import FROZEN_MODES, RunResult
from medssl.config import BenchConfig
from medssl.downstream import figures
from medssl.downstream.figures import Line
from medssl.figures import colours_for


def _save(fig: Figure, path: Path) -> Path:
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


def _lines(cfg: BenchConfig, results: list[RunResult], trained_only: bool = False) -> list[Line]:
    """A line per arm (its seeds), in the config's order; frozen-encoder arms left out if ``trained_only``."""
    colours = colours_for([a.name for a in cfg.arms])
    return [Line(arm.name, colours[arm.name], arm.init == "scratch", runs)
            for arm in cfg.arms if not (trained_only and arm.mode in FROZEN_MODES)
            if (runs := [r.run for r in results if r.spec.arm == arm.name])]


def bench_plots(cfg: BenchConfig, results: list[RunResult], folder: Path) -> list[Path]:
    written = []
    for task in cfg.tasks:
        mine = [r for r in results if r.spec.task == task.name]
        if not mine:
            continue
        fractions = sorted({r.spec.label_fraction for r in mine}, reverse=True)
        panels = [(f"{task.name}: {'all' if f == 1 else f'{f:g}'} of the labels",
                   _lines(cfg, [r for r in mine if r.spec.label_fraction == f], trained_only=True)) for f in fractions]
        written.append(_save(figures.convergence(panels), folder / f"{task.name}-convergence.png"))
        if len(fractions) > 1:
            written.append(_save(figures.label_efficiency(f"{task.name}: ", _lines(cfg, mine)),
                                 folder / f"{task.name}-label-efficiency.png"))
        swept = [r for r in mine if r.robustness and r.robustness.sweeps]
        if swept:
            shown = ", ".join(f"{f:g}" for f in sorted({r.spec.label_fraction for r in swept}))
            written.append(_save(figures.robustness(f"{task.name} (label fraction {shown}, mean over seeds): ",
                                                    _lines(cfg, swept)), folder / f"{task.name}-robustness.png"))
    return written
