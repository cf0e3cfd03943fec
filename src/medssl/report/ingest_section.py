"""The section of one ingest output: counts by modality, status and format, rejections, example images."""

from __future__ import annotations

import tarfile

from medssl.report import html, plots
from medssl.report.collect import IngestOutput
from medssl.report.samples import CT_WINDOW, pick_samples

THUMBNAILS_PER_MODALITY = 6
REJECTED_LISTED = 20


def ingest_section(ingest: IngestOutput, anchor: str) -> html.Section:
    r = ingest.report
    section = html.Section(anchor, f"Ingest: {ingest.name}")
    status = ", ".join(f"{n} {s}" for s, n in sorted(r.get("status", {}).items()))
    section.blocks.append(html.paragraph(
        f"{r.get('files', '?')} input files ({status}); {r.get('samples', '?')} images in {r.get('shards', '?')} "
        f"shards ({r.get('shard_bytes', 0) / 1e6:.1f} MB). Folder: {ingest.path}"))
    section.blocks.append(html.figure(plots.ingest_summary(r), "Left: files ingested and the 2D images made from "
                                      "them, per modality. Right: every input file by outcome.", "ingest summary"))
    modalities = r.get("by_modality", {})
    section.blocks.append(html.table(["modality", "files", "images"],
                                     [[m, v.get("files", 0), v.get("samples", 0)] for m, v in modalities.items()],
                                     numeric={1, 2}))
    if r.get("by_format"):
        section.blocks.append(html.table(["format", "files ingested"], sorted(map(list, r["by_format"].items())),
                                         numeric={1}))
    t = r.get("throughput")
    if t:
        section.blocks.append(html.paragraph(
            f"Throughput of the last run: {t.get('files_processed')} files and {t.get('samples_written')} images in "
            f"{t.get('seconds')} s ({t.get('files_per_s')} files/s, {t.get('images_per_s')} images/s) with "
            f"{t.get('workers')} {t.get('engine')} worker(s)."))
    section.blocks += _rejections(r)
    section.blocks.append(_thumbnails(ingest, list(modalities)))
    return section


def _rejections(r: dict) -> list[str]:
    if not r.get("rejections_by_code"):
        return [html.paragraph("No input file was rejected.")]
    blocks = [html.heading("Rejected files"),
              html.table(["reason", "files"], sorted(map(list, r["rejections_by_code"].items())), numeric={1})]
    rejected = r.get("rejected", [])
    blocks.append(html.table(["file", "reason"], [[x["path"], x["reason"]] for x in rejected[:REJECTED_LISTED]]))
    if len(rejected) > REJECTED_LISTED:
        blocks.append(html.paragraph(f"… and {len(rejected) - REJECTED_LISTED} more (report.md lists them all)."))
    return blocks


def _thumbnails(ingest: IngestOutput, modalities: list[str]) -> str:
    try:
        samples = pick_samples([ingest.path], lambda meta: meta.get("modality", "?"), THUMBNAILS_PER_MODALITY,
                               groups=modalities)
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:
        return html.missing(f"Example images omitted: the shards could not be read ({type(e).__name__}: {e}).")
    if not samples:
        return html.missing("Example images omitted: no sample found in the shards.")
    level, width = CT_WINDOW
    return html.figure(plots.thumbnails(samples, THUMBNAILS_PER_MODALITY),
                       f"Example images per modality, as stored in the shards (CT shown through window level "
                       f"{level:g} width {width:g} HU).", "example images")
