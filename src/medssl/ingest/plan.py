"""The plan of a dataset: which input entries each work unit covers, stored in parts as the listing streams.

A dataset folder is append-only. Each ingest run into it is a *generation*: the first lists the whole
archive, a later one (on a finished dataset) lists it again and plans only the entries no earlier
generation listed (``listing.unseen``). Entry indexes (the manifest's ``index``) count the listing on
across generations.

Mixing. An archive lists the slices of one series next to each other; units of consecutive entries
would write each series into one shard, and a training batch would hold a handful of series (near-copies
as contrastive negatives). So the listing is taken in *blocks* of ``mix_units`` x ``files_per_chunk``
entries, and each block is dealt round-robin to its units: unit j of a block takes entries j, j + W,
j + 2W, ... (W units; fewer in a generation's last block). A series of L slices then spreads over
min(L, W) shards. benchmarks/mixing.py measured the effect: with W = 256, batches hold same-series pairs
at the rate of an i.i.d. draw at 1M samples (1 instead of 113 times it with consecutive units).

Units are numbered on from the previous generation's; unit ``c`` is saved as ``plan/chunk-NNNNNN.json``
with its block (first unit, unit count, last entry). All units of a block are saved before any is handed
out. ``plan/dataset.json`` holds the settings, the inputs and the generations; it is replaced atomically.

Resume: an interrupted generation keeps its saved blocks (each unit always covers the same files, which
is what makes a resumed run produce exactly the samples of an uninterrupted one), drops a block whose
saving was cut short (none of its units ran), and lists on after the last saved block. The driver holds
one block of entries at a time (about 170 bytes per entry): its memory does not grow with the archive.
"""

from __future__ import annotations

import heapq
import itertools
import json
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medssl import storage
from medssl.atomic import atomic_write_text
from medssl.config import ConfigError, IngestConfig, dump_config
from medssl.ingest.listing import Entry, entry_key, scan, unseen
from medssl.privacy import keyed_hash

PLAN_VERSION = 2
# Settings that change what a work unit writes; every generation of a dataset uses the same ones.
PROCESSING_KEYS = ("inputs", "files_per_chunk", "mix_units", "samples_per_shard", "max_side", "planes", "slice_stride",
                   "max_pixels", "max_frame_side", "max_memory_mb", "percentiles", "nifti_modality", "raster_modality",
                   "redact_paths", "modalities", "exclude_modalities", "non_image_objects")


@dataclass
class Generation:
    first_chunk: int
    first_index: int
    chunks: int | None = None   # set when its listing is complete
    files: int | None = None
    finished: bool = False      # merged into the manifest index and report


@dataclass
class Unit:
    chunk: int
    indexes: list[int]          # the entries' indexes in the listing
    entries: list[Entry]
    block: tuple[int, int, Entry]  # (first unit of its block, units in the block, the block's last entry)


@dataclass
class DatasetPlan:
    settings: dict
    roots: list[str]
    generations: list[Generation] = field(default_factory=list)
    paths_dropped: bool = False  # --redact-paths: the plan's paths were deleted after the ingest
    dataset_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this dataset's local caches

    def drop_paths(self, out: Path, salt: bytes) -> None:
        """--redact-paths: once a generation is finished, delete its units and keep the inputs only as
        salted hashes (enough to recognise the same command, not to read the paths back)."""
        gen = self.current
        for chunk in range(gen.first_chunk, gen.first_chunk + gen.chunks):
            storage.remove(unit_path(out, chunk))
        self.roots = redacted(self.roots, salt)
        self.settings["inputs"] = self.roots
        self.paths_dropped = True

    @property
    def current(self) -> Generation:
        return self.generations[-1]

    def path(self, entry: Entry) -> str:
        root = self.roots[entry.root]
        return f"{root}/{entry.rel}" if entry.rel else root

    def shown(self, entry: Entry) -> str:
        """An entry's path as shown to people: relative to its root, prefixed by the root's folder name."""
        root_name = self.roots[entry.root].rstrip("/").rpartition("/")[2]
        return f"{root_name}/{entry.rel}" if entry.rel else root_name

    def save(self, out: Path) -> None:
        body = {"version": PLAN_VERSION, "settings": self.settings, "roots": self.roots,
                "paths_dropped": self.paths_dropped, "dataset_id": self.dataset_id,
                "generations": [asdict(g) for g in self.generations]}
        atomic_write_text(state_path(out), json.dumps(body, indent=1))


def state_path(out: str | Path) -> str | Path:
    return storage.join(out, "plan", "dataset.json")


def unit_path(out: str | Path, chunk: int) -> str | Path:
    return storage.join(out, "plan", f"chunk-{chunk:06d}.json")


def save_unit(out: Path, unit: Unit) -> None:
    first, count, last = unit.block
    atomic_write_text(unit_path(out, unit.chunk), json.dumps(
        {"chunk": unit.chunk, "indexes": unit.indexes, "entries": [list(e) for e in unit.entries],
         "block": [first, count, list(last)]}))


def load_unit(out: Path, chunk: int) -> Unit:
    body = json.loads(storage.read_text(unit_path(out, chunk)))
    first, count, last = body["block"]
    return Unit(body["chunk"], body["indexes"], [Entry(*e) for e in body["entries"]], (first, count, Entry(*last)))


def redacted(paths: list[str], salt: bytes) -> list[str]:
    return [f"redacted-{keyed_hash(p, salt)}" for p in paths]


def saved_chunks(folder: str | Path, suffix: str, first: int) -> set[int]:
    """Numbers of the ``chunk-NNNNNN<suffix>`` files in ``folder`` from unit ``first`` on (the current
    generation's), from one listing: on object storage a request per unit would cost hours at 10^5 units."""
    found = set()
    for name in storage.listdir(folder):
        if name.startswith("chunk-") and name.endswith(suffix) and name[6:-len(suffix)].isdigit():
            number = int(name[6:-len(suffix)])
            if number >= first:
                found.add(number)
    return found


def processing_settings(cfg: IngestConfig) -> dict:
    full = dump_config(cfg)
    full["inputs"] = [str(p) if storage.is_url(p) else str(Path(p).resolve()) for p in cfg.inputs]
    return {k: full[k] for k in PROCESSING_KEYS}


def open_plan(cfg: IngestConfig, out: Path, salt: bytes) -> tuple[DatasetPlan, str]:
    """The dataset's plan with the generation this run works on, and what the run does: ``new`` (an
    empty dataset), ``resume`` (an interrupted generation) or ``add`` (a new generation on a finished
    dataset). Refuses settings other than the dataset's."""
    wanted = processing_settings(cfg)
    if storage.exists(storage.join(out, "plan.json")) or storage.exists(storage.join(out, "manifest.jsonl")):
        raise ConfigError(f"{out} was written by an older medssl (one plan.json / manifest.jsonl); "
                          "ingest into a new --out")
    if not storage.exists(state_path(out)):
        plan = DatasetPlan(wanted, wanted["inputs"], [Generation(0, 0)])
        plan.save(out)
        return plan, "new"
    body = json.loads(storage.read_text(state_path(out)))
    if body.get("version") != PLAN_VERSION:
        raise ConfigError(f"{state_path(out)} was written by an incompatible medssl version; ingest into a new --out")
    plan = DatasetPlan(body["settings"], body["roots"], [Generation(**g) for g in body["generations"]],
                       body["paths_dropped"], body["dataset_id"])
    if plan.paths_dropped:
        wanted["inputs"] = redacted(wanted["inputs"], salt)
    # A setting newer than the dataset's plan is taken at its default (what that version did, or closest).
    defaults = processing_settings(IngestConfig(inputs=cfg.inputs))
    changed = [k for k in wanted if plan.settings.get(k, defaults[k]) != wanted[k]]
    if changed:
        diffs = ", ".join(f"{k}: {plan.settings.get(k)!r} -> {wanted[k]!r}" for k in changed)
        raise ConfigError(f"{out} holds an ingest made with other settings ({diffs}). Rerun with the same "
                          "settings to resume or to add new files, or choose another --out.")
    if not plan.current.finished:
        return plan, "resume"
    if plan.paths_dropped:
        raise ConfigError(f"{out} was ingested with --redact-paths, so its file paths were not kept and new files "
                          "cannot be told from ingested ones; ingest the new files into another --out")
    last = plan.current
    plan.generations.append(Generation(last.first_chunk + last.chunks, last.first_index + last.files))
    plan.save(out)
    return plan, "add"


def planned_units(plan: DatasetPlan, out: Path, min_units: int = 1) -> Iterator[Unit]:
    """The current generation's units: those saved already, then new ones, block by block, as the listing
    streams in. The generation's totals are saved when the listing ends.

    ``min_units``: a block is cut into a multiple of this many units (the workers), so that a small
    archive keeps every worker busy and no worker runs a block's last unit alone.
    """
    gen = plan.current
    chunk, index, last = gen.first_chunk, gen.first_index, None
    saved = saved_chunks(storage.join(out, "plan"), ".json", gen.first_chunk)  # one listing, not a request per unit
    while chunk in saved:
        first, count, block_last = load_unit(out, chunk).block
        if not all(c in saved for c in range(first, first + count)):
            for c in range(first, first + count):  # saving was cut short: none of these units ran
                storage.remove(unit_path(out, c))
            break
        for c in range(first, first + count):
            unit = load_unit(out, c)
            index += len(unit.entries)
            yield unit
        chunk, last = first + count, block_last
    if gen.chunks is not None:
        return
    after = entry_key(last.root, last.rel) if last else None
    listing = scan(plan.roots, out, after)
    earlier = [_entries(out, g) for g in plan.generations[:-1]]
    entries = unseen(listing, earlier) if earlier else listing
    size, mix = plan.settings["files_per_chunk"], plan.settings["mix_units"]
    while block := list(itertools.islice(entries, size * mix)):
        # Unit j of the block takes entries j, j + n, j + 2n, ... Units are saved one by one and read
        # back when handed out, so the driver holds the block's entries and one unit, never the block twice.
        count = len(block)
        units = -(-count // size)
        n = min(count, -(-units // min_units) * min_units)  # a multiple of the workers: no idle tail
        for j in range(n):
            save_unit(out, Unit(chunk + j, list(range(index + j, index + count, n)), block[j::n],
                                (chunk, n, block[-1])))
        del block
        for j in range(n):
            yield load_unit(out, chunk + j)
        chunk, index = chunk + n, index + count
    gen.chunks, gen.files = chunk - gen.first_chunk, index - gen.first_index
    plan.save(out)


def _entries(out: Path, gen: Generation) -> Iterator[Entry]:
    """A finished generation's entries in listing order, one saved block at a time."""
    chunk = gen.first_chunk
    while chunk < gen.first_chunk + gen.chunks:
        first, count, _ = load_unit(out, chunk).block
        units = [load_unit(out, c) for c in range(first, first + count)]
        for _, entry in heapq.merge(*(zip(u.indexes, u.entries) for u in units), key=lambda pair: pair[0]):
            yield entry
        chunk = first + count
