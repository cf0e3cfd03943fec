"""``medssl export``: a run's encoder as a folder other tools open (timm or ONNX), with its card and lineage.

Each export is verified before it is declared done, on real images from the run's own pretraining
shards: the timm folder is loaded back through timm's ``local-dir:`` loader and must give the features
of ``medssl.load_encoder``; the ONNX file is run by onnxruntime and must stay within ``TOLERANCE`` of
torch. The figures go into the card.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl import storage
from medssl.artifacts import read_index
from medssl.config import FinetuneConfig
from medssl.downstream.decode import fit_square
from medssl.downstream.images import to_input
from medssl.models import hub_export, onnx_export
from medssl.models.card import DEFAULT_LICENSE, SOURCES_FILE, public_card, readme
from medssl.models.export import CARD_FILE, load_encoder
from medssl.models.lineage import LineageError, run_lineage, sources_text
from medssl.models.locations import LocationError, locate_shards
from medssl.shard_format import Sample, decode_pixels, read_shard

FORMATS = ("timm", "onnx")
_FILES = {"timm": (hub_export.CONFIG_FILE, hub_export.WEIGHTS_FILE),
          "onnx": (onnx_export.ONNX_FILE, onnx_export.ONNX_FILE + ".data")}  # .data: weights over 2 GiB
_CARD_FILES = (CARD_FILE, "README.md", SOURCES_FILE)
CHECK_CT_WINDOW = FinetuneConfig.model_fields["ct_window"].default  # soft tissue, as `medssl finetune` by default


class ExportError(RuntimeError):
    """The export cannot be made or failed its check."""


def export_run(run_dir: str | Path, fmt: str, out: Path, license: str = DEFAULT_LICENSE,
               shards: list[str | Path] | None = None, check_images: int = 8) -> dict[str, Any]:
    """Write the run's encoder to ``out`` as ``fmt`` (timm or onnx) with README.md, model_card.json and
    sources.sha256; returns the card. ``shards``: the pretraining's ingest outputs, when they moved since
    (default: the folders the run's card names). The card files are written last, once the check passed:
    a folder without model_card.json holds a failed export."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if check_images < 1:
        raise ExportError(f"check_images is {check_images}: an export is checked on at least one image")
    _check_out(out, fmt)
    encoder = load_encoder(run_dir)
    run_card = encoder.model_card
    try:
        folders = [storage.location(s) for s in shards] if shards else locate_shards(run_dir, run_card)
        if not folders:
            raise ExportError(f"{run_dir}'s card names no shard folders: name the pretraining's ingest outputs "
                              "with --shards")
        lineage = run_lineage(folders, run_card["data"]["samples"])
    except (LineageError, LocationError) as e:
        raise ExportError(str(e)) from e
    size = int(run_card["input_size"])
    images = _shard_images(folders, check_images, size)

    out.mkdir(parents=True, exist_ok=True)
    for name in _CARD_FILES:  # an earlier export's card would vouch for weights it never checked
        (out / name).unlink(missing_ok=True)
    if fmt == "timm":
        checks, usage = _export_timm(encoder, run_card, license, out, images)
    else:
        checks, usage = _export_onnx(encoder, run_card, out, images)
    card = public_card(run_card, lineage, license, fmt, checks)
    (out / SOURCES_FILE).write_text(sources_text(lineage))
    (out / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    (out / "README.md").write_text(readme(card, usage))
    return card


def _check_out(out: Path, fmt: str) -> None:
    """Refuse a folder holding other files: a stale file of the other format would be published with it."""
    if not out.is_dir():
        return
    ours = set(_FILES[fmt]) | set(_CARD_FILES)
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if others:
        raise ExportError(f"{out} holds other files ({', '.join(others[:5])}): export into an empty folder")


def _shard_samples(folders: list[str | Path]) -> Iterator[Sample]:
    for folder in folders:
        for shard in read_index(folder).shards:
            yield from read_shard(storage.join(folder, "shards", shard.name))


def _shard_images(folders: list[str | Path], n: int, size: int) -> np.ndarray:
    """The first ``n`` images of the shards as the encoder takes them, prepared as `medssl finetune` does
    (fit to a square, CT through a window): (n, 1, size, size) float32 in [0, 1]."""
    samples = list(itertools.islice(_shard_samples(folders), n))
    if not samples:
        raise ExportError(f"no images in the shards of {', '.join(map(str, folders))} to check the export on")
    images = np.stack([fit_square(decode_pixels(s.pixels, s.meta), size) for s in samples])
    is_ct = torch.tensor([s.meta.get("intensity", {}).get("semantics") == "hounsfield" for s in samples])
    return to_input(torch.from_numpy(images), is_ct, CHECK_CT_WINDOW).numpy()


def _export_timm(encoder, run_card: dict, license: str, out: Path, images: np.ndarray) -> tuple[dict, str]:
    hub_export.write_timm_folder(encoder, int(run_card["input_size"]), license, out)
    loaded = hub_export.load_timm_folder(out)
    with torch.no_grad():
        x = torch.from_numpy(images)
        diff = float((loaded(x) - encoder(x)).abs().max())
    # Same weights, same timm model and kernels: anything but (near) equality is a broken folder.
    if diff > 1e-6:
        raise ExportError(f"{out}: timm's local-dir loader gives features {diff:.3g} away from the run's encoder")
    checks = {"images": len(images), "timm_local_dir_max_abs_diff": diff}
    usage = hub_export.USAGE.format(size=run_card["input_size"], dim=run_card["feature_dim"])
    return checks, usage


def _export_onnx(encoder, run_card: dict, out: Path, images: np.ndarray) -> tuple[dict, str]:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"the ONNX export needs {', '.join(missing)}: pip install them (requirements.txt pins "
                          "the tested versions)")
    path = out / onnx_export.ONNX_FILE
    onnx_export.write_onnx(encoder, int(run_card["in_chans"]), int(run_card["input_size"]), path)
    diff = onnx_export.onnx_max_abs_diff(path, encoder, images)
    if diff > onnx_export.TOLERANCE:
        raise ExportError(f"{path}: onnxruntime's features differ from torch's by up to {diff:.3g} "
                          f"(> {onnx_export.TOLERANCE:g}) on {len(images)} shard images")
    checks = {"images": len(images), "onnxruntime_max_abs_diff": diff, "tolerance": onnx_export.TOLERANCE}
    usage = onnx_export.USAGE.format(file=onnx_export.ONNX_FILE, size=run_card["input_size"],
                                     dim=run_card["feature_dim"], input=onnx_export.INPUT_NAME,
                                     output=onnx_export.OUTPUT_NAME)
    return checks, usage
