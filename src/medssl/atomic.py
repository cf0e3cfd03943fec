"""Atomic file output: write to a temporary name in the same folder, fsync, then rename.

A crash (even SIGKILL) leaves either the old file or the complete new one, never a partial file.
Temporary files are named ``NAME.PID.tmp``; ``remove_stale_tmp`` clears those a crashed run left behind,
and nothing else: a ``.tmp`` file of the user's is not ours to delete.
An object-storage URL (see ``medssl.storage``) is written whole in one upload, which is atomic there.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from medssl.storage import is_url, upload_atomically


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    if is_url(path):
        with upload_atomically(str(path), mode) as f:
            yield f
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


_STALE = re.compile(r".+\.\d+\.tmp")  # the names atomic_open writes to


def remove_stale_tmp(folder: Path, subfolders: tuple[str, ...] = ("",)) -> int:
    """Delete the temporary files of ``atomic_open`` (left by a killed run) directly in ``folder`` / each of
    ``subfolders`` ("" is ``folder`` itself), not below them: only where the caller writes. Returns how many."""
    count = 0
    for name in subfolders:
        here = Path(folder, name)
        if not here.is_dir():
            continue
        for entry in os.scandir(here):
            if _STALE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                count += 1
    return count
