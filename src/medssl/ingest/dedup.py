"""Exact duplicates across work units: the first file (lowest entry index) with a content wins.

Units run in parallel and in any order, each de-duplicating only its own files. When a generation is
finished, its units' manifest rows are replayed in index order against ``content.sqlite``, the
dataset's table of content hash -> first file (SQLite: on disk, so the driver's memory does not grow
with the archive). A row whose content an earlier row holds becomes a duplicate; its samples are
removed from its unit's shards and the unit's manifest part is rewritten. Files of earlier
generations always come first, so a re-exported study is a duplicate of the ingested one and the
dataset's finished shards never change. The outcome depends only on the entry order, never on which
unit finished first, and replaying again after a crash gives the same outcome.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from medssl.atomic import atomic_write_text
from medssl.shard_format import read_shard, write_shard


class ContentIndex:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS content "
                         "(sha256 TEXT PRIMARY KEY, idx INTEGER NOT NULL, path TEXT NOT NULL) WITHOUT ROWID")

    def first(self, sha256: str, index: int, path: str) -> tuple[int, str]:
        """(index, path) of the first file with this content; records this one if it is the first."""
        found = self._db.execute("SELECT idx, path FROM content WHERE sha256 = ?", (sha256,)).fetchone()
        if found is None:
            self._db.execute("INSERT INTO content VALUES (?, ?, ?)", (sha256, index, path))
            return index, path
        return found

    def commit(self) -> None:
        self._db.commit()

    def close(self) -> None:
        self._db.commit()
        self._db.close()


def resolve_unit(index: ContentIndex, rows: list[dict], part: Path, shard_dir: Path) -> list[dict]:
    """Mark the rows of one unit whose content an earlier file holds as duplicates; returns the rows.

    Their samples leave the unit's shards first, then the part is rewritten (each atomically), so a
    crash in between is repaired by the next replay.
    """
    drop: dict[str, set[str]] = {}  # shard name -> sample keys to remove
    changed = False
    for row in rows:
        if row["status"] == "duplicate" or not row.get("sha256"):
            continue
        first, first_path = index.first(row["sha256"], row["index"], row["path"])
        if first == row["index"]:
            continue
        if row.get("samples"):
            drop.setdefault(row["shard"], set()).update(row["samples"])
        for key in ("samples", "empty_frames", "shard", "format", "modality"):
            row.pop(key, None)
        row.update(status="duplicate", reason=f"duplicate: same content as {first_path}")
        changed = True
    if changed:
        for name, keys in drop.items():
            _remove_samples(shard_dir / name, keys)
        atomic_write_text(part, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _remove_samples(shard: Path, keys: set[str]) -> None:
    if not shard.exists():  # removed by an earlier replay: every sample in it was a duplicate
        return
    kept = 0

    def keep():
        nonlocal kept
        for sample in read_shard(shard):  # streamed: the shard is never held in memory
            if sample.key not in keys:
                kept += 1
                yield sample

    write_shard(shard, keep())
    if not kept:
        shard.unlink()
