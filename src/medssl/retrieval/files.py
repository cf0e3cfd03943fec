"""Image files (not shards) as encoder inputs: the archive files given to ``medssl embed`` and the images
uploaded to ``medssl serve``.

A file goes through the same decoding as a fine-tuning task image (``downstream.decode.decode_image``:
medssl's readers, the modality-aware intensity mapping, the middle frame of a volume, resized and padded
to the encoder's input size; CT kept in HU). It is decoded in a decode worker process, so a file that
crashes or hangs its decoder is one rejected file. torch stays out of this module: the worker imports it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medssl.downstream.decode import DecodeSettings, decode_image
from medssl.io import Limits, Rejected, read_image
from medssl.io.isolation import Budget, IsolatedWorker, shared_worker

_HASH_BLOCK = 1 << 20


@dataclass
class DecodedFile:
    key: str            # as ingest names a sample: <first 20 hex of the SHA-256>-<plane letter><frame>
    sha256: str
    modality: str
    frame: int
    values: np.ndarray  # (S, S) float32: HU for CT, else [0, 1]
    is_ct: bool


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def list_image_files(inputs: list[Path]) -> list[Path]:
    """Files given, and every file under folders given, in one sorted order (hidden names skipped)."""
    found = []
    for item in inputs:
        if item.is_dir():
            for folder, dirs, names in os.walk(item, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(folder) / n for n in names if not n.startswith(".")]
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return sorted(set(found))


def decode_file(path: Path, settings: DecodeSettings, budget: Budget,
                worker: IsolatedWorker | None = None) -> DecodedFile:
    """One image file -> encoder-ready values and what the index records of it. Raises ``Rejected``.
    ``worker``: a decode worker of the caller's (of module ``medssl.retrieval.files``), else this
    process's shared one for ``budget``."""
    worker = worker or shared_worker(budget, __name__)
    result, blobs = worker.call("serve_decode_file", {"path": str(path), "settings": asdict(settings)})
    if "rejected" in result:
        raise Rejected(*result["rejected"])
    size = settings.input_size
    values = np.frombuffer(blobs[0], dtype=np.float32).reshape(size, size).copy()
    return DecodedFile(result["key"], result["sha256"], result["modality"], result["frame"], values, result["is_ct"])


def serve_decode_file(args: dict) -> tuple[dict, list[bytes]]:
    """The decode worker's side of ``decode_file``."""
    settings = DecodeSettings(**args["settings"])
    path = Path(args["path"])
    try:
        values, is_ct = decode_image(path, None, settings)
        modality, frame, plane = _header_facts(path, settings)
        sha256 = file_sha256(path)
    except Rejected as r:
        return {"rejected": [r.code, r.detail]}, []
    except MemoryError:
        return {"rejected": ["too_large", "out of memory while decoding"]}, []
    except Exception as e:  # an exotic file is one rejected file, said in words, never a traceback
        return {"rejected": ["internal_error", f"{type(e).__name__} while decoding"]}, []
    key = f"{sha256[:20]}-{plane[0]}{frame:05d}"
    result = {"key": key, "sha256": sha256, "modality": modality, "frame": frame, "is_ct": is_ct}
    return result, [np.ascontiguousarray(values, dtype=np.float32).tobytes()]


def _header_facts(path: Path, settings: DecodeSettings) -> tuple[str, int, str]:
    """(modality, the frame decode_image took, its plane) from the header alone (frames are read lazily)."""
    with warnings.catch_warnings():  # readers' warnings can quote header values
        warnings.simplefilter("ignore")
        src = read_image(path, limits=Limits(max_memory_bytes=settings.max_memory_mb << 20),
                         nifti_modality=settings.nifti_modality, raster_modality=settings.raster_modality)
    # decode_image takes the middle frame; NIfTI volumes are cut into axial slices, other files are 2D frames.
    return src.modality, src.n_frames // 2, "axial" if src.format == "nifti" else "2d"
