"""The figures of downstream results, drawn once for the bench's PNGs and the report's page: convergence,
label efficiency, robustness.

A ``Line`` is what one legend entry stands for: a single run (the report draws each run of a task), or the
seeds of one bench arm (each seed thin, their mean thick). Dashed: from scratch; solid: from a pretrained
encoder. The caller picks lines, colours and titles; these functions only draw.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from medssl.artifacts import DownstreamResult
from medssl.figures import legend, panel_figure


@dataclass
class Line:
    name: str
    colour: str
    scratch: bool
    runs: list[DownstreamResult]

    @property
    def style(self) -> dict:
        return {"color": self.colour, "linestyle": "--" if self.scratch else "-"}


def _panels(n: int, height: float) -> tuple[Figure, list]:
    return panel_figure(n, height=height, width=max(5.0, 4.2 * min(n, 4)), columns=4)


def convergence(panels: list[tuple[str, list[Line]]]) -> Figure:
    """Validation AUC against training step, a panel per (title, lines). A line of several runs: each thin,
    the mean over them (at the evaluations all reached) thick. A run's target AUC: dotted; the step it first
    reached it: a thin vertical line."""
    fig, axes = _panels(len(panels), height=3.8)
    for ax, (title, lines) in zip(axes, panels):
        for line in lines:
            curves = [r.metrics.val_curve() for r in line.runs]
            curves = [c for c in curves if c]
            if len(curves) == 1:
                ax.plot(*zip(*curves[0]), marker="o", markersize=3, label=line.name, **line.style)
            elif curves:
                for curve in curves:
                    ax.plot(*zip(*curve), alpha=0.25, linewidth=0.8, **line.style)
                length = min(map(len, curves))
                steps = np.mean([[p[0] for p in c[:length]] for c in curves], axis=0)
                aucs = np.mean([[p[1] for p in c[:length]] for c in curves], axis=0)
                ax.plot(steps, aucs, linewidth=2, label=f"{line.name} ({len(curves)} seeds)", **line.style)
            if len(line.runs) == 1 and (reached := line.runs[0].metrics.steps_to_target) is not None:
                ax.axvline(reached, color=line.colour, linewidth=0.8, alpha=0.6)
        for target in sorted({r.metrics.target_auc for line in lines for r in line.runs} - {None}):
            ax.axhline(target, color="#555555", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation AUC")
        legend(ax)
    return fig


def label_efficiency(title: str, lines: list[Line]) -> Figure:
    """Test AUC against the label fraction: each run a point with its bootstrap 95% interval, the mean over a
    line's runs at each fraction a line. Runs without a test AUC (e.g. diverged) are left out."""
    fig, (ax,) = _panels(1, height=4.0)
    for line in lines:
        runs = [r for r in line.runs if r.test_auc is not None]
        if not runs:
            continue
        for run in runs:
            auc = run.test_auc
            lo, hi = run.metrics.test_auc_ci or (auc, auc)
            ax.errorbar(run.metrics.label_fraction, auc, yerr=[[auc - lo], [hi - auc]], fmt="o", color=line.colour,
                        alpha=0.5, markersize=4, capsize=3)
        fractions = sorted({r.metrics.label_fraction for r in runs})
        means = [np.mean([r.test_auc for r in runs if r.metrics.label_fraction == f]) for f in fractions]
        ax.plot(fractions, means, label=line.name, **line.style)
    fractions = sorted({r.metrics.label_fraction for line in lines for r in line.runs})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training labels used")
    ax.set_ylabel("test AUC (95% bootstrap interval)")
    ax.set_title(f"{title}label efficiency (line: mean over seeds)")
    legend(ax)
    return fig


def robustness(title: str, lines: list[Line]) -> Figure:
    """Test AUC against perturbation level, a panel per sweep. A line of one run: its curve, its clean AUC
    (dotted) and the paired bootstrap 95% interval of each level's change as a band around the clean AUC
    (where the band holds the dotted line, the change is within the test set's noise); of several runs: the
    mean over them at each level."""
    reports = [r.robustness for line in lines for r in line.runs if r.robustness is not None]
    sweeps = sorted({name for rep in reports for name in rep.sweeps})
    fig, axes = _panels(len(sweeps), height=3.6)
    for ax, sweep in zip(axes, sweeps):
        for line in lines:
            mine = [r.robustness for r in line.runs if r.robustness is not None and r.robustness.sweeps.get(sweep)]
            if not mine:
                continue
            points: dict[float, list[float]] = defaultdict(list)
            for rep in mine:
                for p in rep.sweeps[sweep]:
                    if p.auc is not None:
                        points[p.level].append(p.auc)
            levels = sorted(points)
            ax.plot(levels, [np.mean(points[lvl]) for lvl in levels], marker="o", markersize=3, label=line.name,
                    **line.style)
            if len(mine) == 1:
                clean = mine[0].clean_auc
                ax.axhline(clean, color=line.colour, linestyle=":", linewidth=1)
                banded = [p for p in mine[0].sweeps[sweep] if p.drop_ci]
                if banded:
                    ax.fill_between([p.level for p in banded], [clean - p.drop_ci[1] for p in banded],
                                    [clean - p.drop_ci[0] for p in banded], color=line.colour, alpha=0.15,
                                    linewidth=0)
        ax.set_xlabel(sweep)
        ax.set_ylabel("test AUC")
        ax.set_title(f"robustness: {sweep}")
        legend(ax, fontsize=7)
    sizes = sorted({rep.test_images for rep in reports})
    fig.suptitle(f"{title}robustness ({', '.join(map(str, sizes))} test images; each run's paired intervals are in "
                 "its report)")
    return fig
