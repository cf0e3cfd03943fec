"""The output folder of an ingest: which folders it may write into, and what it may delete there.

An ingest writes into a folder that is empty (or absent), or that is a medssl dataset: one that holds the
mark ``medssl-dataset.json``, written before anything else, or ``plan/dataset.json`` (datasets from before
the mark). Anything else is refused: a user's home folder with notes in it is not a dataset, and medssl
must never clean up files it did not write. For the same reason inputs and output may not overlap: an
output inside an input would be listed as input (its own log and plan among them), an input inside the
output would be mixed with the dataset's files.

Cleaning up after a killed run (``atomic.remove_stale_tmp``) deletes only what ``atomic_open`` leaves
(``NAME.PID.tmp``), and only in the folders an ingest writes (``WRITTEN_FOLDERS``), never below them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medssl import storage
from medssl.atomic import atomic_write_text
from medssl.config import ConfigError

MARK = "medssl-dataset.json"
_MARK_BODY = json.dumps({"kind": "medssl ingest dataset", "version": 1}) + "\n"
_LEGACY_MARK = ("plan", "dataset.json")
WRITTEN_FOLDERS = ("", "shards", "manifest", "plan")  # where an ingest writes; "" is the dataset folder


def _is_dataset(out: str | Path) -> bool:
    return storage.exists(storage.join(out, MARK)) or storage.exists(storage.join(out, *_LEGACY_MARK))


def _contains(outer: str | Path, inner: str | Path) -> bool:
    """Whether ``inner`` is ``outer`` or below it (local paths resolved; URLs by key prefix)."""
    if storage.is_url(outer) != storage.is_url(inner):
        return False
    if storage.is_url(outer):
        a, b = str(outer).rstrip("/"), str(inner).rstrip("/")
        return b == a or b.startswith(a + "/")
    a, b = Path(outer).resolve(), Path(inner).resolve()
    return a == b or a in b.parents


def check_no_overlap(inputs: list, out: str | Path) -> None:
    for root in inputs:
        if _contains(root, out):
            raise ConfigError(f"--out {out} is inside the input {root}: the dataset would be read as input; "
                              "choose an output folder outside the inputs")
        if _contains(out, root):
            raise ConfigError(f"the input {root} is inside --out {out}: choose an output folder that holds no "
                              "inputs")


# A writer's lease (``medssl.lease``) is taken before the mark is written: a folder holding only the lease is
# a dataset being started.
_LEASES = {"ingest.lock", "ingest.lease"}


def check_output(out: str | Path, inputs: list) -> None:
    """Refuse an output folder medssl may not write into (``ConfigError``, one line)."""
    check_no_overlap(inputs, out)
    if storage.is_url(out):
        found = storage.listdir(out)
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder: choose a new or empty folder")
        found = os.listdir(path) if path.is_dir() else []
    found = [name for name in found if name not in _LEASES]
    if found and not _is_dataset(out):
        shown = ", ".join(sorted(found)[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(f"--out {out} is not empty ({shown}) and is not a medssl dataset (no {MARK}): "
                          "choose a new or empty folder, or an earlier ingest's output to resume or add to it")


def mark_dataset(out: str | Path) -> None:
    """Mark a folder that passed ``check_output`` as a medssl dataset (once)."""
    if not storage.exists(storage.join(out, MARK)):
        atomic_write_text(storage.join(out, MARK), _MARK_BODY)

