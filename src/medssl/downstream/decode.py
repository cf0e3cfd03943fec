"""One task image: any file ``medssl ingest`` reads, decoded into the encoder's convention.

Each image goes through the readers and the modality-aware intensity mapping of ingest, so a
fine-tuned model sees what pretraining saw: CT in Hounsfield units, everything else in [0, 1].
It is then resized so that its longer side is ``input_size`` (aspect ratio kept, also upscaled: the
encoder needs one input size) and padded to a square with its own minimum (air in CT, black
otherwise). CT stays in HU (see ``images.to_input``).

Which frame: a 2D file has one. For multi-frame DICOM, multi-page TIFF and NIfTI volumes the middle
frame (axial slice) is used, unless the CSV's path ends in ``#N``: frame / axial slice N (0-based),
e.g. ``ct/vol.nii.gz#40``.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import numpy as np
from PIL import Image

from medssl.config import FinetuneConfig, ResizeMode
from medssl.intensity import map_frame
from medssl.io import Limits, Rejected, read_image
from medssl.io.detect import kind_error
from medssl.io.isolation import Budget, shared_worker


@dataclass(frozen=True)
class DecodeSettings:
    """What ``decode_image`` reads of a ``FinetuneConfig``: all the decode worker is sent. (Validating a
    whole FinetuneConfig there would import torch, through its nested pretraining settings.)"""

    input_size: int
    percentiles: tuple[float, float]
    nifti_modality: str
    raster_modality: str
    max_memory_mb: int
    resize: str = "pad"

    @classmethod
    def of(cls, cfg: FinetuneConfig) -> DecodeSettings:
        return cls(cfg.input_size, tuple(cfg.percentiles), cfg.nifti_modality, cfg.raster_modality, cfg.max_memory_mb,
                   cfg.resize)


_FRAME_SPEC = re.compile(r"^(.*)#(\d+)$")


def resolve_path(csv_dir: Path, raw: str) -> tuple[Path, int | None]:
    """CSV path -> (file, frame index or None). A name that itself ends in ``#N`` and exists wins."""
    path = csv_dir / raw
    match = _FRAME_SPEC.match(raw)
    if match and not path.exists():
        return csv_dir / match.group(1), int(match.group(2))
    return path, None


RESIZE_MODES = get_args(ResizeMode)


def fit_square(values: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """A ``size`` x ``size`` image (bilinear, antialiased when shrinking; small images are enlarged, since
    the encoder needs a fixed input size), by ``mode``:

    - ``pad``: the longer side becomes ``size``, the rest is padded with the image's minimum (as the
      multi-crop sampler does outside images): all of the image, at the resolution of its longer side.
    - ``stretch``: both sides become ``size``: all of the image at full resolution, its aspect changed.
    - ``crop``: the shorter side becomes ``size``, the longer one is cut to the centre: full resolution and
      aspect, the edges of wide frames lost.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}: use one of {', '.join(RESIZE_MODES)}")
    h, w = values.shape
    image = Image.fromarray(values)
    if mode == "stretch":
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    scale = size / (max(h, w) if mode == "pad" else min(h, w))
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)
    if mode == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        return np.ascontiguousarray(resized[top:top + size, left:left + size])
    out = np.full((size, size), values.min(), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def _check_regular_file(path: Path) -> None:
    """What a CSV row names must be a regular file: a folder is not "missing", and a FIFO is never opened
    (it would block the reader)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise Rejected("missing", "no such file") from None
    except OSError as e:
        raise Rejected("unreadable_file", f"cannot inspect the file ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise Rejected("not_a_file", "a folder, not an image file")
    kind = kind_error(mode)
    if kind:
        raise Rejected(*kind.split(": ", 1))


def decode_image(path: Path, frame: int | None, cfg: DecodeSettings | FinetuneConfig) -> tuple[np.ndarray, bool]:
    """One task image -> ((input_size, input_size) float32, is CT in HU). Raises ``Rejected``."""
    _check_regular_file(path)
    opts = dict(limits=Limits(max_memory_bytes=cfg.max_memory_mb << 20),
                nifti_modality=cfg.nifti_modality, raster_modality=cfg.raster_modality)
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
    return fit_square(values, cfg.input_size, cfg.resize), intensity.semantics == "hounsfield"


def decode_image_isolated(path: Path, frame: int | None, cfg: FinetuneConfig) -> tuple[np.ndarray, bool]:
    """``decode_image`` in a decode worker process (``medssl.io.isolation``), so that a decoder crash,
    hang or memory blow-up rejects this image instead of ending the run. Raises ``Rejected``."""
    worker = shared_worker(Budget(cfg.file_timeout_s, cfg.max_memory_mb << 20), __name__)
    args = {"path": str(path), "frame": frame, "settings": asdict(DecodeSettings.of(cfg))}
    result, blobs = worker.call("serve_decode_image", args)  # a worker fault raises Rejected
    if "rejected" in result:
        raise Rejected(*result["rejected"])
    size = cfg.input_size
    return np.frombuffer(blobs[0], dtype=np.float32).reshape(size, size).copy(), result["is_ct"]


def serve_decode_image(args: dict) -> tuple[dict, list[bytes]]:
    """The decode worker's side of ``decode_image_isolated``."""
    settings = DecodeSettings(**args["settings"])
    try:
        values, is_ct = decode_image(Path(args["path"]), args["frame"], settings)
    except Rejected as r:
        return {"rejected": [r.code, r.detail]}, []
    except MemoryError:
        return {"rejected": ["too_large", "out of memory while decoding"]}, []
    except Exception as e:  # an exotic file must be reported with the others, not end the run alone
        return {"rejected": ["internal_error", f"{type(e).__name__} while decoding"]}, []
    return {"is_ct": is_ct}, [np.ascontiguousarray(values, dtype=np.float32).tobytes()]
