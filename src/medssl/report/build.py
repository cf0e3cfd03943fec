"""``build_report``: find the artefacts under a folder and write one self-contained HTML page about them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from medssl import __version__
from medssl.atomic import atomic_write_text
from medssl.bench.results import VERDICT_LEGEND, verdict_lines
from medssl.report import html
from medssl.report.bench_section import bench_section
from medssl.report.collect import Artefacts, find_artefacts
from medssl.report.downstream_section import downstream_sections
from medssl.report.ingest_section import ingest_section
from medssl.report.pretrain_section import pretrain_section
from medssl.report.task_labels import TaskLabels

REPORT_FILE = "report.html"
EMBED_SAMPLES = 300   # t-SNE of a few hundred points takes seconds and already shows the structure


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_report(folder: Path | str, out: Path | str | None = None, task: Path | str | None = None,
                 embed_samples: int = EMBED_SAMPLES, log: Callable[[str], None] = _stderr) -> Path:
    """Write the HTML report of ``folder`` (default ``folder/report.html``) and return its path.

    ``folder``: an ingest output, a pretraining run, a downstream run, or a folder holding several
    (searched two levels down). ``task``: a task CSV whose labels colour the embedding map.
    Raises ``ReportError`` when the folder holds no artefact or the task CSV is unusable.
    """
    folder = Path(folder)
    artefacts = find_artefacts(folder)
    labels = None
    if task is not None:
        log(f"report: hashing the images of {task} to find them in the shards ...")
        labels = TaskLabels(Path(task))
    sections = [_overview(artefacts, labels)]
    if artefacts.bench is not None:
        sections.append(bench_section(folder, artefacts.bench, "bench"))
    for i, ingest in enumerate(artefacts.ingests):
        log(f"report: ingest output {ingest.name}")
        sections.append(ingest_section(ingest, f"ingest-{i}"))
    for i, run in enumerate(artefacts.pretrains):
        log(f"report: pretraining run {run.name}")
        sections.append(pretrain_section(run, f"pretrain-{i}", artefacts.ingests, labels, embed_samples, log))
    if artefacts.downstreams:
        log(f"report: {len(artefacts.downstreams)} downstream run(s)")
        sections += downstream_sections(artefacts.downstreams, "downstream")
    out = Path(out) if out is not None else folder / REPORT_FILE
    subtitle = f"{folder.resolve()} · made {time.strftime('%Y-%m-%d %H:%M')} by medssl {__version__}"
    atomic_write_text(out, html.page(f"medssl report: {folder.resolve().name}", subtitle, sections))
    return out


def _steps(run) -> int | str:
    """Steps a pretraining run trained: its card's count, else the last logged step (not the logged lines:
    a 150-step run logging every 5 steps has 30)."""
    if run.card:
        return run.card.steps
    return max((m.get("step", 0) for m in run.metrics), default=0)


def _overview(artefacts: Artefacts, labels: TaskLabels | None) -> html.Section:
    section = html.Section("overview", "Overview")
    verdicts = verdict_lines(artefacts.bench) if artefacts.bench is not None else []
    if verdicts:  # the answer first, before any table or figure
        section.blocks += [html.heading("In short"), html.paragraph(VERDICT_LEGEND),
                           html.bullets(verdicts)]
    rows = [["ingest output", i.name, f"{i.report.get('samples', '?')} images of "
             f"{', '.join(i.report.get('by_modality', {})) or 'no modality'}"] for i in artefacts.ingests]
    rows += [["pretraining run", r.name, f"{r.card.architecture if r.card else '?'}, "
              f"{_steps(r)} steps" + ("" if r.card else ", unfinished")] for r in artefacts.pretrains]
    rows += [["downstream run", r.name, f"{r.init_kind}, {r.mode}, label fraction {r.label_fraction:g}, test AUC "
              + (f"{r.test_auc:.3f}" if r.test_auc is not None else "—")] for r in artefacts.downstreams]
    section.blocks.append(html.table(["artefact", "folder", "summary"], rows))
    expected = [(artefacts.ingests, "No ingest output (report.json + index.json): ingest summary omitted."),
                (artefacts.pretrains, "No pretraining run (model_card.json, metrics.jsonl): loss curves and "
                                      "embedding map omitted."),
                (artefacts.downstreams, "No downstream run (metrics.json): ROC, convergence, label-efficiency and "
                                        "robustness curves omitted.")]
    section.blocks += [html.missing(text) for found, text in expected if not found]
    section.blocks += [html.missing(note) for note in artefacts.notes]
    if labels is not None:
        found = len(labels.by_source)
        section.blocks.append(html.paragraph(f"Task labels: {labels.csv} ({found} of its {labels.rows} images read)."))
        if labels.missing:
            section.blocks.append(html.missing(f"{len(labels.missing)} image(s) of {labels.csv} do not exist, e.g. "
                                               f"{labels.missing[0]}."))
    return section

