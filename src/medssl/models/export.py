"""The encoder file of a run: ``encoder.safetensors`` plus ``model_card.json``, and rebuilding it in one call.

The card holds everything needed to use the encoder without the training code's config in hand:
architecture, input channels and crop size, the intensity convention its inputs must follow, the
training config, a summary of the data, and the step it was saved at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load, load_file, save
from torch import nn

from medssl import storage
from medssl.artifacts import CARD, ModelCard
from medssl.atomic import atomic_open
from medssl.models.backbone import create_backbone

ENCODER_FILE = "encoder.safetensors"
CARD_FILE = CARD  # the name export and publish use

INTENSITY_CONVENTION = (
    "one grey channel in [0, 1], bright = dense/high signal, no mean/std normalisation; CT shown through "
    "a window (training drew random windows over HU); MR scaled by robust percentiles; radiographs through "
    "their VOI LUT/window with MONOCHROME1 inverted (the conventions of medssl ingest)"
)


def save_encoder(run_dir: str | Path, backbone: nn.Module, card: dict[str, Any]) -> str | Path:
    """Write the backbone's weights and its card atomically (card last: its presence marks a complete pair),
    in a local folder or under an object-storage URL."""
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_open(storage.join(run_dir, ENCODER_FILE), "wb") as f:
        f.write(save(state))
    ModelCard.model_validate({"intensity": INTENSITY_CONVENTION, **card}).write(storage.join(run_dir, CARD_FILE))
    return storage.join(run_dir, ENCODER_FILE)


def read_card(run_dir: str | Path) -> ModelCard:
    path = storage.join(run_dir, CARD_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{run_dir} has no {CARD_FILE}: is it a finished `medssl pretrain` run folder?")
    return ModelCard.read(path)


def load_encoder(run_dir: str | Path) -> nn.Module:
    """Rebuild a pretrained encoder from its run folder: ``medssl.load_encoder("runs/ct")``, or on object
    storage ``medssl.load_encoder("s3://bucket/runs/ct")``.

    Returns the timm backbone (features out, no classifier) in eval mode, with ``.model_card`` (the card as a
    dict) attached.
    """
    run_dir = storage.location(run_dir)
    card = read_card(run_dir)
    backbone, _ = create_backbone(card.architecture, card.in_chans)
    weights = storage.join(run_dir, ENCODER_FILE)
    # A local file is memory-mapped; an object is fetched whole (the weights are all needed anyway).
    backbone.load_state_dict(load(storage.read_bytes(weights)) if storage.is_url(weights) else load_file(weights))
    backbone.model_card = card.model_dump()
    return backbone.eval()
