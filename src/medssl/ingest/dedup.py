"""Exact duplicates across work units: the file with the lowest entry index (first listed) wins.

While units run, ``SeenContent`` (a SQLite table on the machine's local disk, shared by the ingest
processes there) lets a unit skip decoding a file whose content a lower index already holds: such a file
can never win. The lowest-index copy of a content is never skipped (no lower index can hold it), so what
is decoded depends on timing, but what the dataset ends up holding does not. When a generation is
finished, its units' manifest rows are replayed twice against ``content.sqlite``, the dataset's table
of content hash -> first file (SQLite: on disk, so the driver's memory does not grow with the archive):
the first pass records, for every content, the lowest index that holds it; the second marks every other
row with that content as a duplicate, removes its samples from its unit's shards and rewrites the unit's
manifest part. Files of earlier generations have lower indexes, so a re-exported study is a duplicate
of the ingested one and the dataset's finished shards never change. The outcome depends only on the
listing, never on which unit finished first, and replaying again after a crash gives the same outcome.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from medssl import storage
from medssl.atomic import atomic_write_text
from medssl.shard_format import read_shard, write_shard


class ContentIndex:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS content "
                         "(sha256 TEXT PRIMARY KEY, idx INTEGER NOT NULL, path TEXT NOT NULL) WITHOUT ROWID")

    def record(self, sha256: str, index: int, path: str) -> None:
        """Note that file ``index`` holds this content; the lowest index is kept."""
        self._db.execute("INSERT INTO content VALUES (?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET "
                         "idx = excluded.idx, path = excluded.path WHERE excluded.idx < content.idx",
                         (sha256, index, path))

    def first(self, sha256: str) -> tuple[int, str]:
        """(index, path) of the first file recorded with this content."""
        return self._db.execute("SELECT idx, path FROM content WHERE sha256 = ?", (sha256,)).fetchone()

    def commit(self) -> None:
        self._db.commit()

    def close(self) -> None:
        self._db.commit()
        self._db.close()


class SeenContent:
    """Content hash -> lowest index seen so far by the ingest processes of this machine (a cache: losing
    it costs only decodes). ``earlier`` records a file and says whether a lower index holds its content.
    ``content_db`` (the dataset's content.sqlite, read only) adds the contents of earlier ingest runs."""

    @staticmethod
    def create(path: Path) -> None:
        """Make the table, in WAL mode (kept in the file), before the processes that share it start: two
        of them switching a new file to WAL at once would find it locked."""
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS seen (sha256 TEXT PRIMARY KEY, idx INTEGER NOT NULL) WITHOUT ROWID")
            db.commit()

    def __init__(self, path: Path, content_db: Path | None):
        self._db = self._content = None  # without them (they could not be opened) nothing is known
        try:
            self._db = sqlite3.connect(path, timeout=60, isolation_level=None)  # autocommit: one upsert each
            self._db.execute("PRAGMA synchronous=OFF")  # a cache: a crash may lose it
            self._db.execute("CREATE TABLE IF NOT EXISTS seen (sha256 TEXT PRIMARY KEY, idx INTEGER NOT NULL) "
                             "WITHOUT ROWID")
            if content_db is not None and Path(content_db).exists():
                self._content = sqlite3.connect(f"file:{content_db}?mode=ro", uri=True, timeout=60)
        except sqlite3.Error:
            self._db = None

    @property
    def unavailable(self) -> bool:
        return self._db is None

    def earlier(self, sha256: str, index: int) -> bool:
        """Whether a lower index holds this content. A cache that cannot answer (a locked or damaged
        database) answers no: the file is then decoded, and the finish settles duplicates anyway."""
        if self._db is None:
            return False
        try:
            if self._content is not None:
                found = self._content.execute("SELECT idx FROM content WHERE sha256 = ?", (sha256,)).fetchone()
                if found is not None and found[0] < index:
                    return True
            (lowest,) = self._db.execute(
                "INSERT INTO seen VALUES (?, ?) ON CONFLICT (sha256) DO UPDATE SET idx = min(idx, excluded.idx) "
                "RETURNING idx", (sha256, index)).fetchone()
        except sqlite3.Error:
            return False
        return lowest < index

    def close(self) -> None:
        for db in (self._db, self._content):
            if db is not None:
                db.close()


def _compared(row: dict) -> bool:
    """Rows that take part: hashed files, apart from the duplicates their own unit found."""
    return bool(row.get("sha256")) and row["status"] != "duplicate"


def record_unit(index: ContentIndex, rows: list[dict]) -> None:
    for row in rows:
        if _compared(row):
            index.record(row["sha256"], row["index"], row["path"])


def resolve_unit(index: ContentIndex, rows: list[dict], part: str | Path, shard_dir: str | Path) -> list[dict]:
    """Mark the rows of one unit whose content a lower index holds as duplicates; returns the rows.

    Their samples leave the unit's shards first, then the part is rewritten (each atomically), so a
    crash in between is repaired by the next replay.
    """
    drop: dict[str, set[str]] = {}  # shard name -> sample keys to remove
    changed = False
    for row in rows:
        if not row.get("sha256"):
            continue
        first, first_path = index.first(row["sha256"])
        if row["status"] == "duplicate":  # found while the units ran: name the file that holds the content
            reason = f"duplicate: same content as {first_path}"
            changed |= row["reason"] != reason
            row["reason"] = reason
            continue
        if first == row["index"]:
            continue
        for key, shard in zip(row.get("samples", []), row.get("shards", [])):
            drop.setdefault(shard, set()).add(key)
        for key in ("samples", "empty_frames", "shards", "format", "modality"):
            row.pop(key, None)
        row.update(status="duplicate", reason=f"duplicate: same content as {first_path}")
        changed = True
    if changed:
        for name, keys in drop.items():
            _remove_samples(storage.join(shard_dir, name), keys)
        atomic_write_text(part, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _remove_samples(shard: str | Path, keys: set[str]) -> None:
    if not storage.exists(shard):  # removed by an earlier replay: every sample in it was a duplicate
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
        storage.remove(shard)
