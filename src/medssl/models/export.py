"""The encoder file of a run: ``encoder.safetensors`` plus ``model_card.json``, and rebuilding it in one call.

The card holds everything needed to use the encoder without the training code's config in hand:
architecture, input channels and crop size, the intensity convention its inputs must follow, the
training config, a summary of the data, and the step it was saved at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from medssl.atomic import atomic_write_text
from medssl.models.backbone import create_backbone

ENCODER_FILE = "encoder.safetensors"
CARD_FILE = "model_card.json"

INTENSITY_CONVENTION = (
    "one grey channel in [0, 1], bright = dense/high signal, no mean/std normalisation; CT shown through "
    "a window (training drew random windows over HU); MR scaled by robust percentiles; radiographs through "
    "their VOI LUT/window with MONOCHROME1 inverted (the conventions of medssl ingest)"
)


def save_encoder(run_dir: Path, backbone: nn.Module, card: dict[str, Any]) -> Path:
    """Write the backbone's weights and its card atomically (card last: its presence marks a complete pair)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{ENCODER_FILE}.{os.getpid()}.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, run_dir / ENCODER_FILE)
    atomic_write_text(run_dir / CARD_FILE, json.dumps({"intensity": INTENSITY_CONVENTION, **card}, indent=1))
    return run_dir / ENCODER_FILE


def read_card(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CARD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {CARD_FILE}: is it a finished `medssl pretrain` run folder?")
    return json.loads(path.read_text())


def load_encoder(run_dir: Path | str) -> nn.Module:
    """Rebuild a pretrained encoder from its run folder: ``medssl.load_encoder("runs/ct")``.

    Returns the timm backbone (features out, no classifier) in eval mode, with ``.model_card`` attached.
    """
    card = read_card(Path(run_dir))
    backbone, _ = create_backbone(card["architecture"], card["in_chans"])
    backbone.load_state_dict(load_file(str(Path(run_dir) / ENCODER_FILE)))
    backbone.model_card = card
    return backbone.eval()
