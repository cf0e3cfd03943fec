"""List the inputs of an ingest as a stream of entries, in one fixed order, touching nothing but ``stat``.

The order is lexicographic over path components (bytes), depth first: a folder's entries are listed
where its name sorts among its siblings. Because of that order
- the listing never has to be held in memory: it streams straight into work units;
- "everything up to entry K" is a prefix, so an interrupted listing resumes after its last planned
  entry (whole folders before it are skipped without being listed), and a listing can be merged with
  an earlier one (``unseen``) to find the files an archive gained since, in constant memory.
Memory is bounded by the largest folder's name list and the depth of the tree, not by the archive.
"""

from __future__ import annotations

import heapq
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from medssl.config import ConfigError
from medssl.io.detect import kind_error
from medssl.storage import is_url


class Entry(NamedTuple):
    root: int           # index into the input roots
    rel: str            # path relative to its root, "/"-separated ("" when the root is the file itself)
    error: str | None   # scan-time rejection ("code: detail"); None for a regular file to process


def entry_key(root: int, rel: str) -> tuple[int, tuple[bytes, ...]]:
    """The listing's sort key: the root, then the path's components as bytes."""
    return root, tuple(os.fsencode(part) for part in rel.split("/")) if rel else ()


_INSIDE_INPUTS = ("duplicate_folder: a link to a folder inside the inputs; "
                  "its files are listed under their own path")
_WALKED = "duplicate_folder: a link to a folder listed elsewhere in the inputs; its files are listed there once"


def scan(inputs: list[Path], exclude: Path, after: tuple[int, tuple[bytes, ...]] | None = None) -> Iterator[Entry]:
    """Every entry under the inputs, in the listing order, from ``stat`` alone; with ``after``, only the
    entries whose key is greater.

    Only regular files are meant to be opened later; anything else gets an error here: FIFOs, devices
    and sockets (``not_a_regular_file``), folders that cannot be listed (``unreadable_folder``), broken
    links and entries that cannot be inspected (``unreadable_file``). Symbolic links to files are
    followed. A link to a folder inside the inputs gets a ``duplicate_folder`` row (its files are listed
    under their own path); a link to a folder outside them is walked, once: a second link to it, or a
    loop, gets a ``duplicate_folder`` row. A link to the output folder is skipped (the output cannot be
    inside an input: ``ingest.output.check_no_overlap``).
    """
    exclude = Path(exclude).resolve() if not is_url(exclude) else None
    roots = [r if is_url(r) else Path(r) for r in inputs]
    resolved = [r.resolve() for r in roots if not is_url(r)]
    walked: set[tuple[int, int]] = set()  # folders reached through links (outside the inputs)
    for r, root in enumerate(roots):
        if after is not None and r < after[0]:
            continue
        skip = after[1] if after is not None and after[0] == r else None
        if is_url(root):
            yield from _walk_url(r, str(root), skip)
            continue
        try:
            info = root.stat()
        except OSError as e:
            what = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
            raise ConfigError(f"input {root} {what}") from None
        if not stat.S_ISDIR(info.st_mode):
            if after is None or entry_key(r, "") > after:
                yield Entry(r, "", kind_error(info.st_mode))
            continue
        yield from _walk(r, str(root), resolved, exclude, walked, skip)


def _walk_url(r: int, root: str, skip: tuple[bytes, ...] | None) -> Iterator[Entry]:
    """``_walk`` for an object-storage prefix: the same order, from listings of "folders" (key prefixes
    ending in "/"), one level at a time, as a file system is walked. Objects are always regular files."""
    listing = _list_url(root)
    if listing is None:
        raise ConfigError(f"input {root} does not exist (no object has that key or prefix)")
    if isinstance(listing, str):
        yield Entry(r, "", listing)
        return

    def visit(child: str, is_folder: bool):
        if not is_folder:
            return None
        listed = _list_url(f"{root}/{child}")
        return _NO_ROW if listed is None else listed  # None: the prefix vanished since it was listed

    yield from _depth_first(r, listing, skip, visit)


def _list_url(url: str) -> list[tuple[str, bool]] | str | None:
    """(name, is a folder) under a prefix in reverse sorted (byte) order; None if nothing is there;
    an ``unreadable_folder`` error if the listing fails."""
    from medssl.storage import StorageError, filesystem, retrying

    fs, path = filesystem(url)
    try:
        found = retrying("list", url, lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return None
    except StorageError as e:
        if e.transient:  # the store is down: stop the run (resumable) rather than skip a prefix for good
            raise
        cause = type(e.__context__).__name__ if e.__context__ else "OSError"
        return f"unreadable_folder: cannot list the prefix ({cause}); its objects are not ingested"
    if len(found) == 1 and found[0]["type"] == "file" and found[0]["name"].rstrip("/") == path.rstrip("/"):
        return [("", False)]  # the URL is one object
    names = [(item["name"].rstrip("/").rpartition("/")[2], item["type"] == "directory") for item in found]
    return sorted(names, key=lambda n: os.fsencode(n[0]), reverse=True)


def _inside(path: Path, folders: list[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def _walk(r: int, root: str, inputs: list[Path], exclude: Path, walked: set,
          skip: tuple[bytes, ...] | None) -> Iterator[Entry]:
    """Depth first over one folder root of the file system (see ``scan`` for what each entry gets)."""
    listing = _list(root, "")
    if isinstance(listing, str):
        yield Entry(r, "", listing)
        return

    def visit(child: str, _hint: None):
        path = os.path.join(root, child)
        try:
            info = os.stat(path)  # follows symbolic links
        except OSError as e:
            why = "a broken symbolic link" if os.path.islink(path) else f"cannot inspect the entry ({e.strerror})"
            return f"unreadable_file: {why}"
        if not stat.S_ISDIR(info.st_mode):
            return kind_error(info.st_mode)
        if not os.path.islink(path):  # a plain folder below a root: nothing to resolve (resolving every folder
            return _list(root, child)  # of a deep tree costs time cubic in its depth)
        target = Path(path).resolve()
        if target == exclude:
            return _NO_ROW
        if _inside(target, inputs):
            return _INSIDE_INPUTS
        identity = (info.st_dev, info.st_ino)
        if identity in walked:
            return _WALKED
        walked.add(identity)
        return _list(root, child)

    yield from _depth_first(r, listing, skip, visit)


_NO_ROW = object()  # what ``visit`` returns for an entry that gets no row (the output folder)


def _depth_first(r: int, listing: list, skip: tuple[bytes, ...] | None, visit) -> Iterator[Entry]:
    """The walk shared by file systems and object stores: depth first, entries in sorted (byte) order;
    iterative, so depth has no limit. ``listing`` holds (name, hint) pairs, or bare names, in reverse
    order (pop() takes the next). ``visit(child, hint)`` says what an entry is: a listing of its own
    (a folder to descend into), a scan error or None (a row), or ``_NO_ROW``.

    ``skip``: the key of the last entry already planned; folders entirely before it are not listed.
    """
    stack = [("", listing)]
    while stack:
        rel, names = stack[-1]
        if not names:
            stack.pop()
            continue
        name, hint = names.pop() if isinstance(names[-1], tuple) else (names.pop(), None)
        child = f"{rel}/{name}" if rel else name
        key = entry_key(r, child)[1]
        if skip is not None and key <= skip and skip[:len(key)] != key:
            continue  # this entry and, for a folder, everything under it were planned already
        found = visit(child, hint)
        if isinstance(found, list):
            stack.append((child, found))
        elif found is not _NO_ROW and (skip is None or key > skip):
            yield Entry(r, child, found)


def _list(root: str, rel: str) -> list[str] | str:
    """A folder's names in reverse sorted (byte) order, or its ``unreadable_folder`` error."""
    try:
        with os.scandir(os.path.join(root, rel) if rel else root) as entries:
            return sorted((e.name for e in entries), key=os.fsencode, reverse=True)
    except OSError as e:
        return f"unreadable_folder: cannot list the folder ({e.strerror}); its files are not ingested"


def unseen(listing: Iterable[Entry], seen: Iterable[Iterable[Entry]]) -> Iterator[Entry]:
    """The entries of ``listing`` that are in none of the ``seen`` listings (each in listing order):
    a merge, so memory stays constant however long the listings are."""
    earlier = heapq.merge(*seen, key=lambda e: entry_key(e.root, e.rel))
    last = None
    for entry in listing:
        key = entry_key(entry.root, entry.rel)
        while last is None or last < key:
            nxt = next(earlier, None)
            if nxt is None:
                last = (float("inf"),)
                break
            last = entry_key(nxt.root, nxt.rel)
        if last != key:
            yield entry
