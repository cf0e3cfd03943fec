"""Task images decoded once into memory, and windowed per batch.

The whole task is kept as one float32 tensor, N x input_size^2 x 4 bytes. Decoding itself
(``decode.py``) runs in a decode worker process, so a file that crashes or hangs its decoder is one
failed image, not a failed run; torch stays out of that worker.

CT stays in HU in memory and is windowed per batch (``to_input``), so a robustness sweep can shift
the window and the augmentation can jitter it; the encoder always receives one channel in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from medssl.config import FinetuneConfig
from medssl.downstream.decode import decode_image_isolated, resolve_path
from medssl.io import Rejected


def load_images(csv_dir: Path, paths: list[str], cfg: FinetuneConfig,
                show_progress: bool = False) -> tuple[Tensor, Tensor, list[tuple[int, str]]]:
    """Decode every image once: (images (N, S, S), is_ct (N,), [(row, "code: reason"), ...] of failures).

    Failed rows keep a zero image; the caller decides whether to stop or drop them.
    """
    size = cfg.input_size
    images = torch.zeros(len(paths), size, size)
    is_ct = torch.zeros(len(paths), dtype=torch.bool)
    failures = []
    for i, raw in enumerate(tqdm(paths, desc="images", unit="img", disable=not show_progress)):
        path, frame = resolve_path(csv_dir, raw)
        try:
            values, ct = decode_image_isolated(path, frame, cfg)
        except Rejected as r:
            failures.append((i, f"{r.code}: {r.detail}"))
            continue
        images[i] = torch.from_numpy(values)
        is_ct[i] = ct
    return images, is_ct, failures


def to_input(images: Tensor, is_ct: Tensor, window: tuple[float, float]) -> Tensor:
    """Stored images (B, S, S) -> encoder input (B, 1, S, S): CT through ``window`` (level, width) in HU."""
    level, width = window
    windowed = ((images - (level - width / 2)) / width).clamp(0, 1)
    return torch.where(is_ct.view(-1, 1, 1), windowed, images).unsqueeze(1)
