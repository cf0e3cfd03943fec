"""Backbones: a name -> (feature extractor with single-channel input and no classifier, feature dimension),
built offline (random weights).

``BACKBONES`` maps a family to its builder. A plain name (``resnet18``) is a timm model; ``family:name``
picks another family. A new family (the 3D networks of MONAI, say) is a module with a builder of the
``Builder`` signature and one line in ``BACKBONES``; the rest of medssl records the full name in the run's
card and rebuilds it from there.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
from torch import nn

# Tested architectures; any other timm name is passed through unchanged.
KNOWN_BACKBONES = ("resnet18", "resnet50", "densenet121", "vit_small_patch16_224")

# Modules whose models take ``dynamic_img_size``: their position embeddings are interpolated to the
# input's patch grid, so one ViT sees 224-px global and 96/48-px local crops.
_DYNAMIC_SIZE_MODULES = ("timm.models.vision_transformer",)

Builder = Callable[[str, int], tuple[nn.Module, int]]


def timm_backbone(name: str, in_chans: int) -> tuple[nn.Module, int]:
    """``pretrained=False`` always: medical pretraining starts from random weights, and nothing is ever
    downloaded. ``num_classes=0`` makes the model return pooled features."""
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: use a timm model name such as {', '.join(KNOWN_BACKBONES)}")
    extra = {}
    if timm.models.model_entrypoint(name).__module__ in _DYNAMIC_SIZE_MODULES:
        extra["dynamic_img_size"] = True
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **extra)
    return model, model.num_features


BACKBONES: dict[str, Builder] = {
    "timm": timm_backbone,
}


def create_backbone(name: str, in_chans: int = 1) -> tuple[nn.Module, int]:
    """Build a backbone as a feature extractor: (module, feature dimension)."""
    family, _, model = name.rpartition(":")
    builder = BACKBONES.get(family or "timm")
    if builder is None:
        raise ValueError(f"unknown backbone family {family!r} in {name!r}: use one of {', '.join(BACKBONES)} "
                         "(a plain name is a timm model)")
    return builder(model, in_chans)
