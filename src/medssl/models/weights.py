"""Encoder weights from a file the user has: a timm / torchvision state dict, or another medssl run.

RAD-DINO-style continued pretraining starts from general-purpose weights rather than random ones, and
users compare our encoder with the one they use today. Accepted, never downloaded:

- ``*.safetensors``: a flat state dict (timm's and Hugging Face's format);
- ``*.pt`` / ``*.pth`` / ``*.bin``: a PyTorch state dict, read with ``weights_only=True`` (tensors and plain
  containers only: a file that needs unpickling is refused, as it could run code); a dict that nests the
  state dict under ``state_dict`` / ``model`` (training checkpoints) is unwrapped;
- a medssl run folder (``encoder.safetensors`` + ``model_card.json``).

Adapted to our single-channel backbone: a ``module.`` prefix (DDP) is dropped, the classifier of an
ImageNet model (keys the backbone does not have, e.g. ``fc.*``, ``head.*``) is left out, and a 3-channel
first layer becomes 1 channel by summing its filters over the input channels (timm's own rule for
``in_chans=1``: a grey image replicated to RGB gives the same response). Every weight of the backbone must
be in the file with its shape; otherwise the file is refused, naming what is missing.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from medssl.config import ConfigError
from medssl.models.export import load_encoder, read_card

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")


def is_weights_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in WEIGHT_SUFFIXES


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"weights file {path} cannot be read as a state dict without unpickling: {reason}") from None
    while isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} holds no state dict (a mapping of parameter names to tensors)")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _adapt(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """The file's tensors renamed and reshaped to the backbone's; keys the backbone lacks are dropped."""
    adapted = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        want = target.get(key)
        if want is None:
            continue
        if value.shape != want.shape and value.ndim == 4 and value.shape[1] == 3 and want.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # RGB first layer -> grey
        adapted[key] = value.to(want.dtype)
    return adapted


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> dict[str, int]:
    """Load a weights file into ``backbone`` in place; returns counts (loaded, left out of the file)."""
    path = Path(path)
    target = backbone.state_dict()
    state = _read_state_dict(path)
    adapted = _adapt(state, target)
    missing = [k for k in target if k not in adapted]
    mismatched = [k for k in adapted if adapted[k].shape != target[k].shape]
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the backbone's {len(target)} tensors are missing (first: {missing[0]})")
        if mismatched:
            k = mismatched[0]
            problems.append(f"{len(mismatched)} have another shape (first: {k} {tuple(adapted[k].shape)} "
                            f"!= {tuple(target[k].shape)})")
        raise ConfigError(f"weights file {path} does not fit this backbone: {'; '.join(problems)}; is it a "
                          "state dict of the architecture named by `backbone`?")
    backbone.load_state_dict(adapted)
    return {"loaded": len(adapted), "left_out": len(state) - len(adapted)}


def init_backbone(backbone: nn.Module, architecture: str, source: str | Path) -> dict[str, object]:
    """Load ``source`` (a weights file, or a medssl run folder of the same architecture) into ``backbone``;
    returns where the weights came from, for run records."""
    if is_weights_file(source):
        counts = load_backbone_weights(backbone, source)
        return {"weights_file": str(source), **counts}
    try:
        card = read_card(source)
    except FileNotFoundError as e:
        raise ConfigError(f"init {source}: {e}; or give a weights file ({', '.join(WEIGHT_SUFFIXES)})") from None
    if card.architecture != architecture:
        raise ConfigError(f"init {source}: its encoder is a {card.architecture}, this run trains a {architecture}")
    backbone.load_state_dict(load_encoder(source).state_dict())
    return {"run": str(source), "steps": card.steps}
