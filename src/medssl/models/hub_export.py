"""An encoder as a Hugging Face-style timm folder: ``config.json`` + ``model.safetensors``.

timm reads such a folder with its standard call, offline: ``timm.create_model("local-dir:DIR",
pretrained=True)`` (and ``"hf-hub:org/name"`` once the folder is pushed to a hub as it is). timm's
``_hub.load_model_config_from_path`` takes the architecture from ``config.json``, passes ``model_args``
to the model's constructor (so it is built with 1 input channel and ``num_classes=0``: pooled features
out) and keeps ``pretrained_cfg`` as the model's preprocessing (``timm.data.resolve_data_config``).

The config is written here rather than by ``timm.models.save_for_hf``: that one copies the architecture's
ImageNet pretrained_cfg (tag, licence, paper, source URL), which would misdescribe these weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import timm.models
from safetensors.torch import save
from torch import nn

from medssl.atomic import atomic_open

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def timm_config(encoder: nn.Module, input_size: int, license: str) -> dict[str, Any]:
    """config.json of a medssl encoder (a timm model built by ``create_backbone``)."""
    model_args = timm.models.get_model_args(encoder)  # in_chans, num_classes=0, global_pool, ViT's dynamic size
    shape = timm.models.get_model_input_config(encoder)
    channels = model_args["in_chans"]
    return {
        "architecture": encoder.pretrained_cfg["architecture"],
        "num_classes": 0,
        "num_features": encoder.num_features,
        "global_pool": model_args.get("global_pool"),
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "medssl",
            "custom_load": False,
            "input_size": [channels, input_size, input_size],
            "fixed_input_size": shape["fixed_input_size"],
            # medssl letterboxes (whole image, padded): no centre crop cuts anatomy off
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.0] * channels,
            "std": [1.0] * channels,
            "num_classes": 0,
            "first_conv": shape["first_conv"],
            "classifier": encoder.pretrained_cfg.get("classifier"),
            "license": license,
        },
    }


def write_timm_folder(encoder: nn.Module, input_size: int, license: str, out: Path) -> None:
    """Write the weights and config.json into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    # Bytes through atomic_open, not safetensors' save_file: that writes its file 0600, unlike the folder's
    # other files, so a shared export was unreadable to the user's colleagues.
    with atomic_open(out / WEIGHTS_FILE) as f:
        f.write(save(state, metadata={"format": "pt"}))
    config = timm_config(encoder, input_size, license)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_timm_folder(folder: Path) -> nn.Module:
    """The folder through timm's own loader, as a user would open it (eval mode)."""
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


USAGE = """```python
import timm, torch

model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()  # or "hf-hub:ORG/NAME"
x = torch.rand(1, 1, {size}, {size})  # one grey channel in [0, 1], see Preprocessing
with torch.no_grad():
    features = model(x)  # (1, {dim})
```"""
