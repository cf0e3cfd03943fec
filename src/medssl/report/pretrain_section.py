"""The section of one pretraining run: model card, loss and throughput curves, an embedding map."""

from __future__ import annotations

import math
import tarfile
from collections.abc import Callable
from pathlib import Path

from medssl.artifacts import INDEX, ModelCard
from medssl.report import html, plots
from medssl.report.collect import IngestOutput, PretrainRun
from medssl.report.embedding import encode, project_2d
from medssl.report.samples import CT_WINDOW, pick_samples
from medssl.report.task_labels import TaskLabels

CARD_SETTINGS = ("backbone", "crops", "batch_size", "optimizer", "lr", "epochs", "max_steps", "w_cluster",
                 "w_contrast", "n_prototypes", "temperature", "queue_length")


def pretrain_section(run: PretrainRun, anchor: str, ingests: list[IngestOutput], labels: TaskLabels | None,
                     embed_samples: int, log: Callable[[str], None]) -> html.Section:
    section = html.Section(anchor, f"Pretraining: {run.name}")
    section.blocks.append(html.paragraph(f"Folder: {run.path}"))
    if run.card is None:
        section.blocks.append(html.missing("No model_card.json: the run has not finished (or was not started with "
                                           "medssl pretrain); model details and embedding map omitted."))
    else:
        section.blocks.append(_card_table(run.card))
    if run.metrics:
        section.blocks.append(html.figure(
            plots.pretrain_curves(run),
            "Left: the hybrid objective and its parts per logged step (SwAV swapped prediction, InfoNCE). "
            "Right: training images per second (solid) and learning rate (dashed).", "pretraining curves"))
    else:
        section.blocks.append(html.missing("No loss records in metrics.jsonl: loss and throughput curves omitted."))
    if run.card is not None:
        if run.has_encoder:
            section.blocks += _embedding(run, ingests, labels, embed_samples, log)
        else:
            section.blocks.append(html.missing("No encoder.safetensors: embedding map omitted."))
    return section


def _card_table(card: ModelCard) -> str:
    rows = [["architecture", card.architecture], ["feature dimension", card.feature_dim],
            ["input", f"{card.in_chans} channel, {card.input_size} px"], ["steps", card.steps],
            ["training images", card.data.samples],
            ["by modality", ", ".join(f"{m} {n}" for m, n in card.data.by_modality.items())]]
    config = card.config
    rows.append(["settings", ", ".join(f"{k}={config[k]}" for k in CARD_SETTINGS if config.get(k) is not None)])
    return html.table(["model card", ""], rows)


def _shard_folders(run: PretrainRun, ingests: list[IngestOutput]) -> list[Path]:
    """The run's shard folders as its card names them (absolute, or relative to the run or the current folder);
    else the ingest outputs found beside it in the report folder."""
    found = []
    for name in run.card.data.shard_folders:
        for candidate in (Path(name), run.path / name):
            if (candidate / INDEX).is_file():
                found.append(candidate)
                break
    return found or [i.path for i in ingests]


def _embedding(run: PretrainRun, ingests: list[IngestOutput], labels: TaskLabels | None, embed_samples: int,
               log: Callable[[str], None]) -> list[str]:
    folders = _shard_folders(run, ingests)
    if not folders:
        return [html.missing(f"Embedding map omitted: the shard folders of the model card "
                             f"({run.card.data.shard_folders}) were not found, and the report "
                             "folder holds no ingest output.")]
    blocks = []
    # The pool's modalities always (a map of the task's images alone had one colour), and with a task CSV
    # also its labeled images, each half of the budget; the label panel marks the other images.
    label_of_key: dict[str, str | None] = {}

    def modality(meta: dict) -> str:
        if labels is not None:
            label_of_key[meta.get("key")] = labels.label_of(meta)
        return meta.get("modality", "?")

    try:
        labeled = []
        if labels is not None and labels.by_source:
            log(f"report: picking labeled shard images for {run.name} ...")
            labeled = pick_samples(folders, labels.label_of, math.ceil(embed_samples / 2 / len(labels.classes)),
                                   groups=labels.classes)
            if not labeled:
                blocks.append(html.missing(f"None of the {len(labels.by_source)} images of {labels.csv} was found in "
                                           "the shards (matched by file content): map coloured by modality only."))
        by_label = bool(labeled)
        log(f"report: picking shard images for {run.name} ...")
        modalities = list(run.card.data.by_modality) or None
        budget = embed_samples - min(len(labeled), embed_samples // 2)
        per_modality = math.ceil(budget / len(modalities)) if modalities else budget
        picked = pick_samples(folders, modality, per_modality, groups=modalities)
        keys = {s.key for s in labeled}
        samples = labeled + [s for s in picked if s.key not in keys]
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:
        return [html.missing(f"Embedding map omitted: the shards could not be read ({type(e).__name__}: {e}).")]
    samples = samples[:embed_samples]
    if len(samples) < 3:
        return blocks + [html.missing(f"Embedding map omitted: {len(samples)} image(s) in the shards, 3 needed.")]
    log(f"report: encoding {len(samples)} images with {run.name}'s encoder ...")
    try:
        coords, method = project_2d(encode(run.path, samples))
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:  # a damaged or foreign encoder file
        return blocks + [html.missing("Embedding map omitted: the encoder could not be used "
                                      f"({type(e).__name__}: {e}).")]
    colourings = [("modality", [s.modality for s in samples])]
    level, width = CT_WINDOW
    caption = (f"{len(samples)} shard images through this run's encoder (CT through window level {level:g} width "
               f"{width:g} HU, resized to {run.card.input_size} px), features L2-normalised, mapped to 2D "
               f"by {method}. Nearby points are images the encoder finds similar.")
    if by_label:
        keys = {s.key for s in labeled}
        colourings.append(("task label", [s.group if s.key in keys else (label_of_key.get(s.key) or "not in the task")
                                          for s in samples]))
        caption += (f" Labels from {labels.csv}, matched by file content; every image of a labeled file carries its "
                    "label.")
    blocks.append(html.figure(plots.embedding_map(coords, colourings, method), caption, "embedding map"))
    return blocks
