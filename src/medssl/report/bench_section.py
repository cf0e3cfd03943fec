"""The section of a bench folder (``results.json`` of ``medssl bench`` or ``medssl demo``): the three claims
answered in tables, and the bench's own figures (each seed-averaged over the matrix of runs)."""

from __future__ import annotations

import base64
from pathlib import Path

from medssl.bench.results import (
    ACCURACY_LEGEND,
    CURVE_LEGEND,
    ROBUSTNESS_LEGEND,
    accuracy_table,
    curve_table,
    robustness_table,
    run_notes,
    setup_lines,
)
from medssl.report import html

CAPTIONS = {
    "convergence": "Validation AUC against training step, one panel per label fraction: thin lines are single runs "
                   "(seeds), thick lines their mean. Dashed: from scratch; solid: from the pretrained encoder.",
    "label-efficiency": "Test AUC against the fraction of training labels used: points are runs, lines the mean "
                        "over seeds.",
    "robustness": "Test AUC as the test images are perturbed further, one panel per perturbation (mean over seeds).",
    "pretraining-length": "Frozen-encoder probes (kNN dashed, linear solid) on the encoder saved along pretraining: "
                          "test AUC against pretraining steps, mean over seeds.",
}


def bench_section(folder: Path, summary: dict, anchor: str) -> html.Section:
    section = html.Section(anchor, "Bench: SSL against scratch (accuracy, convergence, robustness)")
    section.blocks += [html.paragraph(line) for line in setup_lines(summary)]
    section.blocks += [html.heading("Accuracy and convergence"), html.paragraph(ACCURACY_LEGEND),
                       html.table(*accuracy_table(summary), numeric={2, 3})]
    headers, rows = robustness_table(summary)
    if rows:
        section.blocks += [html.heading("Robustness"), html.paragraph(ROBUSTNESS_LEGEND),
                           html.table(headers, rows, numeric=set(range(2, len(headers))))]
    else:
        section.blocks.append(html.missing("No run of this bench has a robustness sweep."))
    headers, rows = curve_table(summary)
    if rows:
        section.blocks += [html.heading("Pretraining length"), html.paragraph(CURVE_LEGEND),
                           html.table(headers, rows, numeric=set(range(3, len(headers))))]
    for failure in summary.get("failures", []):
        section.blocks.append(html.missing(f"Run {failure['run']} failed: {failure['error']}"))
    notes = summary.get("notes", []) + run_notes(summary)  # the bench's notes, then diverged / unscored runs
    section.blocks += [html.paragraph(f"Note: {note}") for note in notes]
    for name in summary.get("plots", []):
        path = folder / name
        if not path.is_file():
            section.blocks.append(html.missing(f"Figure {name} is missing."))
            continue
        kind = next((k for k in CAPTIONS if path.stem.endswith(k)), None)
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        section.blocks.append(html.figure(uri, f"{path.stem}. {CAPTIONS.get(kind, '')}", path.stem))
    return section
