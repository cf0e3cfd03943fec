"""Task images: any file ``medssl ingest`` reads, decoded once into memory in the encoder's convention.

Each image goes through the readers and the modality-aware intensity mapping of ingest, so a
fine-tuned model sees what pretraining saw: CT in Hounsfield units, everything else in [0, 1].
It is then resized so that its longer side is ``input_size`` (aspect ratio kept, also upscaled: the
encoder needs one input size) and padded to a square with its own minimum (air in CT, black
otherwise), and kept in memory as float32, N x input_size^2 x 4 bytes for the whole task.

CT stays in HU in memory and is windowed per batch (``to_input``), so a robustness sweep can shift
the window and the augmentation can jitter it; the encoder always receives one channel in [0, 1].

Which frame: a 2D file has one. For multi-frame DICOM, multi-page TIFF and NIfTI volumes the middle
frame (axial slice) is used, unless the CSV's path ends in ``#N``: frame / axial slice N (0-based),
e.g. ``ct/vol.nii.gz#40``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from medssl.config import FinetuneConfig
from medssl.intensity import map_frame
from medssl.io import Rejected, read_image
from medssl.privacy import scrub

_FRAME_SPEC = re.compile(r"^(.*)#(\d+)$")


def resolve_path(csv_dir: Path, raw: str) -> tuple[Path, int | None]:
    """CSV path -> (file, frame index or None). A name that itself ends in ``#N`` and exists wins."""
    path = csv_dir / raw
    match = _FRAME_SPEC.match(raw)
    if match and not path.exists():
        return csv_dir / match.group(1), int(match.group(2))
    return path, None


def fit_square(values: np.ndarray, size: int) -> np.ndarray:
    """Resize (bilinear, antialiased when shrinking) so the longer side is ``size``, pad to a square.

    Unlike ingest's ``resize_longest_side`` this also enlarges small images: the encoder needs a
    fixed input size. Padding uses the image's minimum, as the multi-crop sampler does outside images.
    """
    h, w = values.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(values).resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)
    out = np.full((size, size), values.min(), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def decode_image(path: Path, frame: int | None, cfg: FinetuneConfig) -> tuple[np.ndarray, bool]:
    """One task image -> ((input_size, input_size) float32, is CT in HU). Raises ``Rejected``."""
    if not path.is_file():
        raise Rejected("missing", "no such file")
    opts = dict(nifti_modality=cfg.nifti_modality, raster_modality=cfg.raster_modality)
    # Readers' warnings can quote header values (identifiers): keep them off the console.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = read_image(path, **opts)
        index = frame if frame is not None else src.n_frames // 2
        if index >= src.n_frames:
            raise Rejected("no_such_frame", f"frame {index} asked for, the file has {src.n_frames} frames/slices")
        if index > 0:
            # stride=index: the DICOM and NIfTI readers then decode frames 0 and index only, not all before it.
            src = read_image(path, stride=index, **opts)
        chosen = next(f for f in src.frames if f.index == index)
    if not np.isfinite(chosen.pixels).all():
        raise Rejected("non_finite", f"frame {index} contains NaN or infinite values")
    mapped = map_frame(src, chosen, cfg.percentiles)
    if mapped is None:
        raise Rejected("empty", f"frame {index} is constant" if src.n_frames > 1 else "the image is constant")
    values, intensity = mapped
    return fit_square(values, cfg.input_size), intensity.semantics == "hounsfield"


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
            values, ct = decode_image(path, frame, cfg)
        except Rejected as r:
            failures.append((i, f"{r.code}: {r.detail}"))
            continue
        except MemoryError:
            failures.append((i, "too_large: out of memory while decoding"))
            continue
        except Exception as e:  # an exotic file must be reported with the others, not end the run alone
            failures.append((i, f"internal_error: {scrub(f'{type(e).__name__}: {e}')}"))
            continue
        images[i] = torch.from_numpy(values)
        is_ct[i] = ct
    return images, is_ct, failures


def to_input(images: Tensor, is_ct: Tensor, window: tuple[float, float]) -> Tensor:
    """Stored images (B, S, S) -> encoder input (B, 1, S, S): CT through ``window`` (level, width) in HU."""
    level, width = window
    windowed = ((images - (level - width / 2)) / width).clamp(0, 1)
    return torch.where(is_ct.view(-1, 1, 1), windowed, images).unsqueeze(1)
