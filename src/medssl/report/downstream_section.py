"""The section of one downstream task: its runs, SSL against scratch, ROC, convergence, label efficiency,
robustness. Runs on the same task CSV share one section so that their curves can be overlaid."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from medssl.downstream import figures
from medssl.downstream.figures import Line
from medssl.report import html, plots
from medssl.report.collect import DownstreamRun
from medssl.report.predictions import PREDICTION_FILES


def downstream_sections(runs: list[DownstreamRun], anchor: str) -> list[html.Section]:
    by_task: dict[str, list[DownstreamRun]] = defaultdict(list)
    for run in runs:
        by_task[run.task].append(run)
    return [_task_section(task, members, f"{anchor}-{i}") for i, (task, members) in enumerate(sorted(by_task.items()))]


def _task_section(task: str, runs: list[DownstreamRun], anchor: str) -> html.Section:
    path = Path(task)
    section = html.Section(anchor, f"Downstream: {path.parent.name}/{path.name}" if path.parent.name else task)
    colours = plots.colours_for([r.name for r in runs])
    section.blocks.append(html.paragraph(f"Task CSV: {task}. Test AUC: macro over labels, with its bootstrap 95% "
                                         "interval."))
    section.blocks.append(_runs_table(runs))
    section.blocks += _comparison(runs)

    with_predictions = [r for r in runs if r.predictions]
    if with_predictions:
        section.blocks.append(html.figure(plots.roc_curves(with_predictions, colours),
                                          "ROC curves on the test images, one panel per output.", "ROC curves"))
    lacking = [r.name for r in runs if not r.predictions]
    if lacking:
        section.blocks.append(html.missing(f"No predictions file ({' or '.join(PREDICTION_FILES)}) in "
                                           f"{', '.join(lacking)}: not in the ROC curves."))

    each = [Line(r.name, colours[r.name], r.init_kind == "scratch", [r]) for r in runs]
    if any(r.metrics.val_curve() for r in runs):
        section.blocks.append(html.figure(
            plots.data_uri(figures.convergence([("convergence", each)])),
            "Validation AUC after each evaluation. Dashed: from scratch; solid: from a pretrained encoder. Dotted "
            "horizontal line: the target AUC; thin vertical line: the step a run first reached it.", "convergence"))
    else:
        section.blocks.append(html.missing("No validation AUC in any run's history: convergence curves omitted."))

    scored = [r for r in runs if r.test_auc is not None]
    fractions = sorted({r.label_fraction for r in scored})
    if len(fractions) >= 2:
        section.blocks.append(html.figure(
            plots.data_uri(figures.label_efficiency("", _series(scored))),
            "Test AUC against the fraction of training labels used, per initialisation and mode; each point is "
            "one run (seed) with its 95% bootstrap interval.", "label efficiency"))
    else:
        section.blocks.append(html.missing(f"Label efficiency omitted: runs at {len(fractions)} label fraction(s) "
                                           f"({', '.join(f'{f:g}' for f in fractions)}); two or more are needed."))

    with_robustness = [line for line in each if line.runs[0].robustness and line.runs[0].robustness.sweeps]
    if with_robustness:
        section.blocks.append(html.figure(
            plots.data_uri(figures.robustness("", with_robustness)),
            "Test AUC as the test images are perturbed further (one panel per perturbation); dotted line: the "
            "run's AUC on clean images; band: the paired bootstrap 95% interval of each level's change (the same "
            "test images resampled for clean and perturbed scores). Where the band holds the dotted line, the "
            "change is within the noise of a test set of that size.", "robustness curves"))
    else:
        section.blocks.append(html.missing("No robustness.json in any run: robustness curves omitted."))
    return section


def _series(runs: list[DownstreamRun]) -> list[Line]:
    """A line per initialisation and mode, over the label fractions and seeds of its runs."""
    series: dict[tuple[str, str], list[DownstreamRun]] = defaultdict(list)
    for run in runs:
        series[(run.init_kind, run.mode)].append(run)
    colours = plots.colours_for([f"{k} {m}" for k, m in sorted(series)])
    return [Line(f"{kind}, {mode}", colours[f"{kind} {mode}"], kind == "scratch", members)
            for (kind, mode), members in sorted(series.items())]


def _auc(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "—"


def _runs_table(runs: list[DownstreamRun]) -> str:
    rows = []
    for r in sorted(runs, key=lambda r: (r.init_kind, r.mode, r.label_fraction, r.name)):
        m = r.metrics
        reached = "—" if m.target_auc is None else ("never" if m.steps_to_target is None else m.steps_to_target)
        rows.append([r.name, r.init, r.mode, f"{r.label_fraction:g}", m.seed,
                     _auc(r.test_auc), "—" if r.test_auc_ci is None else "{:.3f}–{:.3f}".format(*r.test_auc_ci),
                     _auc(m.best_val_auc), reached])
    return html.table(["run", "init", "mode", "label fraction", "seed", "test AUC", "95% interval", "best val AUC",
                       "steps to target"], rows, numeric={3, 4, 5, 6, 7, 8})


def _comparison(runs: list[DownstreamRun]) -> list[str]:
    """SSL against scratch at equal mode and label fraction, stated whatever it shows.

    Verdicts use the overlap of the bootstrap 95% intervals (averaged over seeds): a conservative reading
    that claims a difference only when the intervals are apart.
    """
    groups: dict[tuple[str, float], dict[str, list[DownstreamRun]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.test_auc is not None:
            groups[(r.mode, r.label_fraction)][r.init_kind].append(r)
    rows = []
    for (mode, fraction), kinds in sorted(groups.items()):
        if not (kinds["SSL"] and kinds["scratch"]):
            continue
        ssl, scratch = _summary(kinds["SSL"]), _summary(kinds["scratch"])
        if ssl["lo"] > scratch["hi"]:
            verdict = "SSL better (intervals apart)"
        elif scratch["lo"] > ssl["hi"]:
            verdict = "scratch better (intervals apart)"
        else:
            verdict = "no clear difference (intervals overlap)"
        rows.append([mode, f"{fraction:g}", f"{ssl['auc']:.3f} ({ssl['n']})", f"{scratch['auc']:.3f} ({scratch['n']})",
                     f"{ssl['auc'] - scratch['auc']:+.3f}", verdict])
    if not rows:
        return [html.missing("No SSL-against-scratch comparison: no pair of runs, one from a pretrained encoder and "
                             "one from scratch, with the same mode and label fraction.")]
    return [html.heading("Pretrained (SSL) against scratch"),
            html.table(["mode", "label fraction", "SSL test AUC (runs)", "scratch test AUC (runs)", "difference",
                        "reading"], rows, numeric={1, 2, 3, 4})]


def _summary(runs: list[DownstreamRun]) -> dict:
    aucs = [r.test_auc for r in runs]
    cis = [r.test_auc_ci or (r.test_auc, r.test_auc) for r in runs]
    return {"auc": float(np.mean(aucs)), "lo": float(np.mean([c[0] for c in cis])),
            "hi": float(np.mean([c[1] for c in cis])), "n": len(runs)}
