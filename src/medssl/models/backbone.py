"""Backbones from timm with single-channel input and no classifier, built offline (random weights)."""

from __future__ import annotations

import timm
from torch import nn

# Tested architectures; any other timm name is passed through unchanged.
KNOWN_BACKBONES = ("resnet18", "resnet50", "densenet121", "vit_small_patch16_224")

# Modules whose models take ``dynamic_img_size``: their position embeddings are interpolated to the
# input's patch grid, so one ViT sees 224-px global and 96/48-px local crops.
_DYNAMIC_SIZE_MODULES = ("timm.models.vision_transformer",)


def create_backbone(name: str, in_chans: int = 1) -> tuple[nn.Module, int]:
    """Build a timm model as a feature extractor: (module, feature dimension).

    ``pretrained=False`` always: medical pretraining starts from random weights, and nothing is
    ever downloaded. ``num_classes=0`` makes the model return pooled features.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: use a timm model name such as {', '.join(KNOWN_BACKBONES)}")
    extra = {}
    if timm.models.model_entrypoint(name).__module__ in _DYNAMIC_SIZE_MODULES:
        extra["dynamic_img_size"] = True
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **extra)
    return model, model.num_features
