"""The house style of medssl's figures (report, bench plots, the pretraining-length curve): one colour per
run across figures, and panels of axes on a ``matplotlib.figure.Figure`` (never pyplot: no global
state, no GUI backend, Agg on any machine)."""

from __future__ import annotations

from matplotlib.figure import Figure

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
DPI = 110


def colours_for(names: list[str]) -> dict[str, str]:
    """One fixed colour per name, so a run looks the same in every figure."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def panel_figure(panels: int, height: float = 3.6, width: float = 10.0,
                 columns: int | None = None) -> tuple[Figure, list]:
    """A figure of ``panels`` axes, at most ``columns`` per row (default: one row); height and width per row."""
    cols = min(panels, columns or panels)
    rows = -(-panels // cols)
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.remove()
    for ax in axes[:panels]:
        ax.grid(alpha=0.3)
    return fig, axes[:panels]


def legend(ax, fontsize: int = 8, **options) -> None:
    """The axes' legend, if anything in them has a label, placed beside the axes (never over the curves).
    ``options`` go to ``Axes.legend``, e.g. ``loc`` to put it inside after all."""
    handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return
    options = options or {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}
    ax.legend(fontsize=fontsize, **options)
