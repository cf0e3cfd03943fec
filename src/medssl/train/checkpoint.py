"""Checkpoints for exact resume: model, optimiser, step, loss state (queue), data position and RNG states.

Written atomically by rank 0 (write to a temporary file, fsync, rename; on object storage one upload), so
a crash at any moment leaves the previous checkpoint intact.

Run folders get shared, so a checkpoint is data, never code: it is read with ``weights_only=True``
(tensors and plain containers only; unpickling anything else could run code). Everything saved is
therefore made of tensors, numbers, strings, lists and dicts: the RNG states, which Python and NumPy
give as tuples and arrays, are converted here on saving and back on loading. A file that needs more
than that (e.g. written by an older medssl, or crafted) is refused with a ``CheckpointError``.
"""

from __future__ import annotations

import io
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl import storage
from medssl.atomic import atomic_open
from medssl.config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used, named with why; like a wrong path given, a usage error (exit 2)."""


def rng_state() -> dict[str, Any]:
    """Every random state, as tensors and plain values (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key": uint32 array, "pos"}, ...}
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {**numpy, "state": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                                     "pos": numpy["state"]["pos"]}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state({**numpy, "state": {"key": numpy["state"]["key"].numpy().astype(np.uint32),
                                            "pos": numpy["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dict saved at ``path`` (local or object storage), which must hold ``keys``; loaded without
    running any code from the file."""
    try:
        # An object is fetched whole in one request: a consistent version even while a run replaces it.
        f = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or type(e).__name__}") from None
    with f, warnings.catch_warnings():
        # torch warns about the pickle protocol of files it did not write, before refusing them anyway.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"{path} was written by an older medssl or is not a medssl checkpoint; it holds "
                                  "objects that only unpickling could rebuild, which could run code, so it is not "
                                  "loaded: move it away and rerun the command that writes it") from None
        except Exception:  # noqa: BLE001 - torch's readers raise many kinds (EOFError, OSError, KeyError...) on a bad file
            raise CheckpointError(f"{path} is truncated or not a medssl checkpoint: move it away and rerun the "
                                  "command that writes it") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a medssl checkpoint of this kind (no {', '.join(missing)}): move it "
                              "away and rerun the command that writes it")
    return state
