"""The model card of an exported encoder: ``model_card.json`` (for programs) and ``README.md`` (for people
and model hubs), both made from the run's card and its data lineage.

A run's own card names its shard folders and run folder; an exported card travels to other people, so
it carries no path at all: the training settings lose their location-valued keys, and the data are
described by counts and by the SHA-256 list in ``sources.sha256`` beside the card.
"""

from __future__ import annotations

import re
from typing import Any

from medssl.models.export import INTENSITY_CONVENTION
from medssl.models.lineage import Lineage

SOURCES_FILE = "sources.sha256"
DEFAULT_LICENSE = "unspecified (set it with `medssl export --license`)"

# Training settings that hold locations (shard folders, run folder, initial weights): left out of the card.
_LOCATION_SETTINGS = ("shards", "out", "init")

RESIZE = ("longest side resized to input_size (bilinear, antialiased when shrinking), then padded to a square "
          "with the image's minimum (medssl finetune / probe do exactly this)")
CT_WINDOW_HINT = "CT: choose a window for the task, e.g. soft tissue (level 40, width 400 HU) or brain (40, 80)"


def public_card(run_card: dict[str, Any], lineage: Lineage, license: str, fmt: str,
                checks: dict[str, Any]) -> dict[str, Any]:
    """The exported card: what the encoder is, what to feed it, what it was trained on, under which licence."""
    size = int(run_card["input_size"])
    config = run_card.get("config", {})
    return {
        "format": fmt,
        "architecture": run_card["architecture"],
        "in_chans": run_card["in_chans"],
        "feature_dim": run_card["feature_dim"],
        "output": f"pooled features (batch, {run_card['feature_dim']}); no classifier",
        "preprocessing": {
            "input": f"float32 (batch, {run_card['in_chans']}, {size}, {size})",
            "input_size": size,
            "mean": [0.0], "std": [1.0],
            "intensity": INTENSITY_CONVENTION,
            "resize": RESIZE,
            "ct_window": CT_WINDOW_HINT,
        },
        "training": {
            "method": "medssl pretrain: SwAV clustering + InfoNCE on multi-crop views, from random weights"
                      + (" (continued from other weights: their training data are not listed here)"
                         if config.get("init") else ""),
            "steps": run_card["steps"],
            "medssl_version": run_card.get("medssl_version"),
            "settings": {k: v for k, v in config.items() if k not in _LOCATION_SETTINGS},
        },
        "data": {
            "images": lineage.images,
            "source_files": len(lineage.sources),
            "by_modality": lineage.by_modality,
            "sources": f"{SOURCES_FILE}: SHA-256 of each source file the pretraining pool held, one per line",
        },
        "license": license,
        "checks": checks,
    }


def _hub_license(license: str) -> str:
    """Model hubs take a licence identifier (apache-2.0, cc-by-nc-4.0, ...) in the card's metadata; any
    other text becomes ``other`` there (the card's text still states it)."""
    return license if re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", license) else "other"


def readme(card: dict[str, Any], usage: str) -> str:
    """README.md with the metadata block model hubs read, then the card in words. ``usage``: Markdown."""
    pre, data, train = card["preprocessing"], card["data"], card["training"]
    modality_rows = [f"| {m} | {c['files']} | {c['images']} |" for m, c in data["by_modality"].items()]
    checks = [f"- {name}: {value}" for name, value in card["checks"].items()]
    return "\n".join([
        "---",
        "library_name: timm" if card["format"] == "timm" else "library_name: onnx",
        f"license: {_hub_license(card['license'])}",
        "pipeline_tag: image-feature-extraction",
        "tags:", "- medical-imaging", "- self-supervised", "- medssl",
        "---",
        f"# {card['architecture']} encoder pretrained with medssl", "",
        (f"A {card['architecture']} feature extractor ({card['in_chans']} grey input channel, "
         f"{card['feature_dim']} features out, no classifier), self-supervised on {data['images']} images from "
         f"{data['source_files']} source files. Licence: {card['license']}."), "",
        "## Usage", "", usage, "",
        "## Preprocessing", "",
        f"- input: {pre['input']}, mean {pre['mean']} / std {pre['std']} (no normalisation beyond [0, 1])",
        f"- intensity: {pre['intensity']}",
        f"- resize: {pre['resize']}",
        f"- {pre['ct_window']}", "",
        "## Training data", "",
        "| modality | source files | images |", "| --- | ---: | ---: |", *modality_rows, "",
        (f"The SHA-256 of every source file is in `{SOURCES_FILE}` (no names or paths). Anyone who holds a file "
         "can check whether it was in the training data: publish that list only where that is acceptable."), "",
        "## Training", "",
        (f"{train['method']}; {train['steps']} steps (medssl {train['medssl_version']}). All settings are in "
         "`model_card.json`."), "",
        "## Checks at export", "", *checks, "",
    ])
