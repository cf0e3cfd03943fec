"""The report's figures, each returned as a ``data:image/png;base64,...`` URI to embed in the page. The
downstream results' convergence, label-efficiency and robustness figures are ``downstream.figures`` (the
bench draws them too); ``downstream_section`` turns them into URIs with ``data_uri``.

Figures are built with ``matplotlib.figure.Figure`` directly, never pyplot: no global state, no GUI
backend, and ``savefig`` renders through Agg on any machine (headless CI included).
"""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.figure import Figure

from medssl.figures import DPI, PALETTE, colours_for, legend, panel_figure
from medssl.report.collect import DownstreamRun, PretrainRun
from medssl.report.samples import ShardImage

STATUS_COLOURS = {"ingested": "#2ca02c", "rejected": "#d62728", "duplicate": "#7f7f7f"}


def data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def ingest_summary(report: dict) -> str:
    fig, (by_modality, by_status) = panel_figure(2, height=3.0)
    modalities = list(report.get("by_modality", {}))
    x = np.arange(len(modalities))
    files = [report["by_modality"][m].get("files", 0) for m in modalities]
    images = [report["by_modality"][m].get("samples", 0) for m in modalities]
    by_modality.bar_label(by_modality.bar(x - 0.2, files, 0.4, label="files", color=PALETTE[0]))
    by_modality.bar_label(by_modality.bar(x + 0.2, images, 0.4, label="images", color=PALETTE[1]))
    by_modality.set_xticks(x, modalities)
    by_modality.set_title("ingested, by modality")
    by_modality.legend(loc="upper left", ncols=2)
    status = report.get("status", {})
    names = sorted(status)
    by_status.bar_label(by_status.bar(names, [status[s] for s in names],
                                      color=[STATUS_COLOURS.get(s, PALETTE[4]) for s in names]))
    by_status.set_title("input files, by status")
    for ax in (by_modality, by_status):
        ax.margins(y=0.3)   # headroom for the bar labels and the legend
        ax.yaxis.get_major_locator().set_params(integer=True)
    return data_uri(fig)


def thumbnails(samples: list[ShardImage], per_row: int) -> str:
    groups = sorted({s.group for s in samples})
    fig = Figure(figsize=(1.5 * per_row, 1.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), per_row, squeeze=False)
    for row, group in zip(axes, groups):
        shown = [s for s in samples if s.group == group][:per_row]
        for ax, sample in zip(row, shown):
            ax.imshow(sample.image, cmap="gray", vmin=0, vmax=1)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        row[0].set_ylabel(group, rotation=0, ha="right", va="center", fontsize=11)
    return data_uri(fig)


def _smooth(values: np.ndarray) -> np.ndarray | None:
    """A running mean when there are enough points for noise to hide the trend; None otherwise."""
    if len(values) < 100:
        return None
    window = len(values) // 50
    return np.convolve(values, np.ones(window) / window, mode="valid")


def pretrain_curves(run: PretrainRun) -> str:
    fig, (loss_ax, speed_ax) = panel_figure(2)
    steps = np.array([m["step"] for m in run.metrics])
    for key, colour in (("loss", "#000000"), ("swav", PALETTE[0]), ("infonce", PALETTE[1])):
        if not all(isinstance(m.get(key), (int, float)) for m in run.metrics):
            continue
        values = np.array([m[key] for m in run.metrics], dtype=float)
        smooth = _smooth(values)
        loss_ax.plot(steps, values, color=colour, alpha=0.35 if smooth is not None else 1.0,
                     label=None if smooth is not None else key)
        if smooth is not None:
            loss_ax.plot(steps[len(steps) - len(smooth):], smooth, color=colour, label=f"{key} (running mean)")
    for ax in (loss_ax, speed_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.set_xlabel("step")
    loss_ax.set_title("loss: total = w_cluster·SwAV + w_contrast·InfoNCE")
    loss_ax.legend()
    if all("images_per_s" in m for m in run.metrics):
        speed_ax.plot(steps, [m["images_per_s"] for m in run.metrics], color=PALETTE[2], label="images/s")
        speed_ax.set_ylabel("images/s", color=PALETTE[2])
    if all("lr" in m for m in run.metrics):
        lr_ax = speed_ax.twinx()
        lr_ax.plot(steps, [m["lr"] for m in run.metrics], color=PALETTE[4], linestyle="--")
        lr_ax.set_ylabel("learning rate", color=PALETTE[4])
    speed_ax.set_xlabel("step")
    speed_ax.set_title("throughput and learning rate")
    return data_uri(fig)


def embedding_map(coords: np.ndarray, colourings: list[tuple[str, list[str]]], method: str) -> str:
    """One panel per colouring: (title, one group name per point)."""
    fig, axes = panel_figure(len(colourings), height=4.6, width=5.0 * len(colourings))
    for ax, (title, groups) in zip(axes, colourings):
        names = sorted(set(groups))
        colours = colours_for(names)
        for name in names:
            at = np.array([g == name for g in groups])
            ax.scatter(coords[at, 0], coords[at, 1], s=14, color=colours[name], label=f"{name} ({at.sum()})")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{method}, coloured by {title}")
        legend(ax, markerscale=1.5)
    return data_uri(fig)


def roc_curves(runs: list[DownstreamRun], colours: dict[str, str]) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve

    outputs = sorted({o for r in runs for o in r.predictions})
    fig, axes = panel_figure(len(outputs), height=4.0, width=max(5.0, 3.6 * len(outputs)))
    for ax, output in zip(axes, outputs):
        for run in runs:
            if output not in run.predictions:
                continue
            targets, scores = run.predictions[output]
            if len(set(targets.tolist())) < 2:
                continue  # no ROC without both classes among the test images
            fpr, tpr, _ = roc_curve(targets, scores)
            ax.plot(fpr, tpr, color=colours[run.name], label=f"{run.name} (AUC {roc_auc_score(targets, scores):.3f})")
        ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC: {output}")
        ax.set_aspect("equal")
        ax.legend(fontsize=8, loc="lower right")
    return data_uri(fig)
