"""Stream the shards of ``medssl ingest`` into training: epoch-shuffled, split across DDP ranks and
DataLoader workers, mixed across the epoch, resumable mid-epoch, in memory independent of the data set's size.

How an epoch is cut. Every rank and worker computes the same plan from (seed, epoch); nothing is
communicated, so all ranks must use the same seed, shards, batch size and worker count.

1. The shards of all archives are put in a seeded random order. Their samples, concatenated in that
   order, form the epoch's sequence of N samples (per-shard counts come from each ``index.json``).
2. Every rank gets the same number of samples, a whole number of batches: DDP needs the same step count
   on every rank. A rank's batches are dealt to its DataLoader workers in the order the DataLoader
   collects them (batch j comes from worker j % num_workers), which fixes each worker's sample count.
   The rest (fewer than world_size * batch_size samples) is dropped for this epoch; it sits at the end
   of the sequence in a fresh shard order, so each epoch drops different samples.
3. Every (rank, worker) reader takes ``interleave`` (K) parts of the sequence, spread over all of it:
   the sequence is cut into K rounds, and each round holds one contiguous part of every reader, of
   1/K of its samples. A reader reads its K parts at once, one open shard each, taking samples from
   them in turn (sample t of the reader is sample t // K of part t % K), and shuffles that through a
   bounded buffer seeded by (seed, epoch, rank, worker).

Why parts. A shard holds a few series in folder order (the slices of one series are neighbours), so a
reader that streams one shard at a time fills its buffer from a handful of series, and the batches it
makes hold near-copies. With K parts open, a buffer of B samples holds about B / K neighbouring
samples from each part, so a batch mixes about K + B / L series (L: slices per series): a same-series
pair share of about 1 / (K + B / L). On a small archive the parts are finer than a series and spread
over the whole epoch, so the reader's samples are a fair sample of the data set and batches are close to
i.i.d.; on a large one the share stays near 1 / (K + B / L), above the i.i.d. share of one series'
samples among all N (a sequential reader cannot do better without shards that are already mixed:
benchmarks/mixing.py and BENCHMARKS.md, "Batch mixing", measure both). The cost of a part is its first
shard, read from the start up to the part: at most K extra shard reads per reader and epoch.

Resume. The position is (epoch, samples of this rank consumed in it), counted by ``ShardLoader`` as it
hands out batches. Because step 2 fixes which worker made which batch, a restarted worker knows how many
of its own samples were consumed (a new DataLoader starts at worker 0, so after b batches worker k plays
the part of worker (k + b) % num_workers). The buffer shuffles positions, not samples, so fast-forwarding
draws only random numbers (about 0.2 s per 10^6 skipped samples); then the worker reads just the shards
that still hold samples it owes: those left in the buffer (at most about shuffle_buffer * ln(shuffle_buffer)
positions back) and everything after, in each part. Skipped samples are never decoded or transformed.
Exact resume needs the same seed, shards, world size, batch size, worker count and ``interleave``;
``load_state_dict`` checks them.

Augmentations are reproducible too: ``transform`` runs with torch's CPU generator and numpy's and
Python's global generators seeded from (seed, epoch, sample key), so a resumed run draws the same crops,
whichever rank or worker reads the sample. In the main process (num_workers=0) their previous states are
restored afterwards, so the trainer's random state does not depend on the data. A transform holding its
own seeded generator (e.g. ``MultiCrop(seed=...)``) is outside this and will not resume exactly.

For crops on the training device (``medssl.data.device_crops``), ``pixels="stored"`` hands out the uint16
stored values instead of floats, with the seed the transform would have run with, and ``collate_stored``
puts a batch of them on one canvas: the workers then only read and decode.

Memory per worker: at most ``shuffle_buffer`` + ``interleave`` + 1 encoded samples (16-bit PNG bytes,
~0.1-0.5 MB at 512 px) and ``interleave`` open shard readers (a file handle and a 10 KB tar buffer
each; on object storage a ``medssl.storage.READ_BLOCK`` of 4 MiB each), plus one decoded image at a time.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from medssl import storage
from medssl.artifacts import DatasetIndex
from medssl.shard_format import Sample, decode_pixels, decode_stored, read_shard

# First word of every SeedSequence we build, so the streams of different purposes never coincide.
_SHARD_ORDER, _BUFFER = 0, 1
_DRAW_BLOCK = 4096  # random buffer slots drawn per numpy call: per-call overhead dominates single draws
# Parts a reader reads at once (module docstring, step 3), chosen on BENCHMARKS.md, "Batch mixing": with 32
# the demo pool's batches are i.i.d. (16: 1.2x); at 1M samples the same-series share halves from 16 to 32
# (about 1 / (K + B / L)) for 7% more samples read (parts starting inside a shard), and 32 open shard
# readers per worker are still cheap on a local disk and on object storage.
DEFAULT_INTERLEAVE = 32


@dataclass(frozen=True)
class Shard:
    path: str | Path  # a local path or an object-storage URL (medssl.storage)
    samples: int


@dataclass(frozen=True)
class Segment:
    """Samples ``first .. first + count - 1`` of a shard, at positions ``pos .. pos + count - 1`` of a part."""

    shard: Shard
    first: int
    count: int
    pos: int


def list_shards(roots: list[str | Path]) -> list[Shard]:
    """The shards of one or more ingest output folders (local or object storage), in the order of their
    ``index.json``."""
    shards = []
    for root in roots:
        index_file = storage.join(root, "index.json")
        if not storage.exists(index_file):
            raise FileNotFoundError(f"{index_file} is missing: {root} is not a finished `medssl ingest` output "
                                    "(run or resume `medssl ingest ... --out` on it first)")
        shards += [Shard(storage.join(root, "shards", s.name), s.samples)
                   for s in DatasetIndex.read(index_file).shards if s.samples]
    return shards


def rank_samples(total: int, world_size: int, batch_size: int) -> int:
    """Samples per rank and epoch: the same on every rank and a whole number of batches."""
    return total // world_size // batch_size * batch_size


def worker_batches(n_batches: int, num_workers: int, worker: int) -> tuple[int, int]:
    """(first, count) of a rank's batches read by ``worker``: the DataLoader takes batch j from
    worker j % num_workers, so the worker's count is how many j have that remainder."""
    base, extra = divmod(n_batches, num_workers)
    return worker * base + min(worker, extra), base + (worker < extra)


def worker_consumed(consumed_batches: int, num_workers: int, worker: int) -> int:
    """How many of the first ``consumed_batches`` batches of a rank came from ``worker``."""
    return max(0, consumed_batches - worker + num_workers - 1) // num_workers


def epoch_shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's seeded shard order (module docstring, step 1)."""
    return np.random.default_rng([_SHARD_ORDER, seed, epoch]).permutation(n_shards)


def reader_parts(counts: list[int], reader: int, parts: int) -> list[tuple[int, int]]:
    """(start, count) in the epoch's sequence of each of the ``parts`` parts of ``reader``, where ``counts``
    are the sample counts of all readers (rank-major). Round k holds part k of every reader, in reader
    order, so each reader's parts are spread over the whole sequence; part sizes differ by at most one."""
    counts_a = np.asarray(counts, dtype=np.int64)
    sizes = counts_a[:, None] // parts + (np.arange(parts)[None, :] < counts_a[:, None] % parts)
    in_sequence = sizes.T.ravel()  # round by round, reader by reader
    starts = (np.cumsum(in_sequence) - in_sequence).reshape(parts, len(counts))
    return [(int(starts[k, reader]), int(sizes[reader, k])) for k in range(parts)]


def part_of(t: int, n: int, parts: int) -> tuple[int, int]:
    """(part, index in the part) of sample ``t`` of a reader with ``n`` samples taken from its parts in
    turn: t // parts of part t % parts, and the parts holding one more sample end the last turn."""
    whole = n // parts * parts
    return (t % parts, t // parts) if t < whole else (t - whole, n // parts)


def reader_index(part: int, index: int, n: int, parts: int) -> int:
    """The inverse of ``part_of``: which sample of the reader ``index`` of ``part`` is."""
    turns = n // parts
    return index * parts + part if index < turns else turns * parts + part


def first_index_from(part: int, t: int, n: int, parts: int) -> int:
    """The first index of ``part`` whose reader sample is ``t`` or later (past the part's end if none)."""
    turns = n // parts
    index = max(0, -(-(t - part) // parts))
    if index < turns:
        return index
    return turns if turns * parts + part >= t else turns + 1


def run_segments(shards: list[Shard], ends: list[int], start: int, stop: int) -> list[Segment]:
    """Cut positions ``start .. stop - 1`` of the concatenated samples of ``shards`` (whose cumulative
    counts are ``ends``) into per-shard pieces."""
    segments = []
    if start >= stop:
        return segments
    for i in range(bisect.bisect_right(ends, start), len(shards)):
        offset = ends[i] - shards[i].samples
        if offset >= stop:
            break
        lo, hi = max(start, offset), min(stop, ends[i])
        segments.append(Segment(shards[i], lo - offset, hi - lo, lo - start))
    return segments


class BufferedShuffle:
    """Shuffle ``range(n)`` through a buffer of ``size`` slots: once full, each new position replaces a
    random slot, whose position is emitted; at the end the rest comes out in random order.

    Shuffling positions rather than samples lets a resumed worker fast-forward with random numbers
    alone; ``buffer`` and ``pulled`` then tell which samples it still has to read.
    """

    def __init__(self, n: int, size: int, rng: np.random.Generator):
        self.n, self.size, self.rng = n, size, rng
        self.buffer: list[int] = []
        self.pulled = 0  # positions 0 .. pulled - 1 have entered the buffer

    def __iter__(self) -> Iterator[int]:
        draws: list[int] = []
        while self.pulled < self.n:
            if len(self.buffer) < self.size:
                self.buffer.append(self.pulled)
                self.pulled += 1
                continue
            if not draws:
                draws = self.rng.integers(0, self.size, _DRAW_BLOCK).tolist()[::-1]
            slot = draws.pop()
            out, self.buffer[slot] = self.buffer[slot], self.pulled
            self.pulled += 1
            yield out
        self.rng.shuffle(self.buffer)
        while self.buffer:
            yield self.buffer.pop()


@dataclass
class ReaderPlan:
    """One reader's epoch: the segments of each of its parts, its sample count, and the shuffle of its
    positions (position t is index ``part_of(t, samples, len(parts))`` of a part)."""

    parts: list[list[Segment]]
    samples: int
    shuffle: BufferedShuffle


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 64-bit seed for the augmentation of one sample in one epoch."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest(), "little")


@contextmanager
def seeded_global_rngs(seed: int, restore: bool) -> Iterator[None]:
    """Seed torch's CPU, numpy's and Python's global generators (~6 us). ``restore`` puts the previous
    states back (~80 us more, mostly numpy's): needed in the trainer's own process (num_workers=0),
    whose random state must not depend on the data, not in a DataLoader worker."""
    saved = (torch.default_generator.get_state(), np.random.get_state(), random.getstate()) if restore else None
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed CUDA too
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        if saved:
            torch.default_generator.set_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


def collate_samples(samples: list[dict]) -> dict:
    """Batch ``values`` with torch's default collate; keys and metadata stay lists (their fields vary)."""
    return {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples],
            "values": default_collate([s["values"] for s in samples])}


def collate_stored(samples: list[dict]) -> dict:
    """Batch samples of ``pixels="stored"``: their uint16 values in the top-left corner of one canvas of the
    batch's largest height and width (zeros elsewhere), as int16 with the same bits (every device copies
    int16; torch has few uint16 kernels), with each image's (height, width) and augmentation seed."""
    shapes = np.array([s["values"].shape for s in samples], dtype=np.int64)
    canvas = np.zeros((len(samples), *shapes.max(axis=0)), dtype=np.uint16)
    for i, s in enumerate(samples):
        canvas[i, : shapes[i, 0], : shapes[i, 1]] = s["values"]
    return {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples],
            "values": torch.from_numpy(canvas.view(np.int16)), "sizes": torch.from_numpy(shapes),
            "seeds": [s["seed"] for s in samples]}


def _distributed_layout(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
    if rank is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size


class ShardStream(IterableDataset):
    """Samples ``{"key", "meta", "values"}`` of one rank's share of an epoch (see the module docstring).

    ``values`` is the decoded float32 (H, W) array in the sample's convention (HU, or [0, 1]), or what
    ``transform(values, meta["intensity"]["semantics"])`` returned. With ``pixels="stored"`` it is the
    uint16 stored array (value = stored * scale + offset, ``meta["intensity"]["store"]``) and the sample
    has a ``seed``: the one the transform would have run with, for augmentation elsewhere (batch them
    with ``collate_stored``). ``batch_size`` and ``num_workers`` must be those of the DataLoader: build it
    with ``loader()``.
    """

    def __init__(self, roots: Path | str | list[Path | str], *, batch_size: int = 1, num_workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 1000, interleave: int = DEFAULT_INTERLEAVE,
                 transform: Callable | None = None, pixels: str = "values", rank: int | None = None,
                 world_size: int | None = None):
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1 or interleave < 1 or seed < 0:
            raise ValueError("need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 1, interleave >= 1 "
                             "and seed >= 0")
        if pixels not in ("values", "stored") or (pixels == "stored" and transform is not None):
            raise ValueError(f"pixels must be 'values' or 'stored' (got {pixels!r}), and a transform takes values")
        self.pixels = pixels
        self.roots = [storage.location(r) for r in (roots if isinstance(roots, list) else [roots])]
        self.shards = list_shards(self.roots)
        self.total = sum(s.samples for s in self.shards)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle_buffer, self.interleave, self.transform = shuffle_buffer, interleave, transform
        self.rank, self.world_size = _distributed_layout(rank, world_size)
        self.samples_per_rank = rank_samples(self.total, self.world_size, batch_size)
        if self.samples_per_rank == 0:
            raise ValueError(f"{self.total} samples in {', '.join(map(str, self.roots))} cannot fill one batch of "
                             f"{batch_size} on each of {self.world_size} ranks; ingest more data or use smaller "
                             "batches")
        self.epoch = 0
        self.consumed = 0  # samples of this rank handed out in this epoch (counted by ShardLoader)

    @property
    def steps_per_epoch(self) -> int:
        return self.samples_per_rank // self.batch_size

    def __len__(self) -> int:
        return self.samples_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``; a no-op if already in it, so a loop that calls it at the top of
        every epoch keeps the position restored by ``load_state_dict``."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def _layout(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "interleave": self.interleave, "samples": self.total,
                "shards": len(self.shards)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if changed and state["consumed"]:
            diffs = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume mid-epoch with a different layout ({diffs}): the same samples would "
                             "not follow. Restore the old settings, or start the next epoch with "
                             f"set_epoch({state['epoch'] + 1}) instead of loading this state.")
        if state["consumed"] % self.batch_size or not 0 <= state["consumed"] <= self.samples_per_rank:
            raise ValueError(f"position {state['consumed']} is not a whole number of batches of {self.batch_size} "
                             f"within the {self.samples_per_rank} samples of an epoch")
        self.epoch, self.consumed = state["epoch"], state["consumed"]

    def loader(self, **kwargs) -> ShardLoader:
        """A DataLoader with this stream's batch size and worker count that keeps the position."""
        return ShardLoader(self, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        # Read the position now, not on the first next(): ShardLoader moves it while batches flow.
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.consumed and num_workers != max(self.num_workers, 1):
            raise RuntimeError(f"this stream resumes a position recorded with {self.num_workers} DataLoader "
                               f"workers but runs in {num_workers}; build the DataLoader with stream.loader()")
        consumed_batches = self.consumed // self.batch_size
        # A new DataLoader takes its first batch from worker 0, but the epoch continues with batch
        # `consumed_batches`, which came from worker consumed_batches % num_workers: rotate the roles.
        role = (worker + consumed_batches) % num_workers
        return self._iterate(self.epoch, consumed_batches, role, num_workers, in_worker=info is not None)

    def _iterate(self, epoch: int, consumed_batches: int, worker: int, num_workers: int,
                 in_worker: bool) -> Iterator[dict]:
        plan = self.reader_plan(epoch, worker, num_workers)
        positions = iter(plan.shuffle)
        for _ in range(worker_consumed(consumed_batches, num_workers, worker) * self.batch_size):
            next(positions)
        samples = self._read_parts(plan.parts, plan.samples, keep=set(plan.shuffle.buffer), start=plan.shuffle.pulled)

        # Samples arrive in position order and wait here until the shuffle asks for them; this holds
        # only samples whose positions sit in the shuffle buffer, so at most shuffle_buffer + 1 (and
        # the merge of the parts holds the next sample of each part).
        pending: dict[int, Sample] = {}
        for pos in positions:
            while pos not in pending:
                got, sample = next(samples)
                pending[got] = sample
            yield self._decode(pending.pop(pos), epoch, restore_rngs=not in_worker)

    def reader_plan(self, epoch: int, worker: int, num_workers: int) -> ReaderPlan:
        """What this rank's ``worker`` reads in ``epoch``, and in which order (module docstring, steps 1-3).
        Opens nothing: benchmarks/mixing.py plans 10^6 samples with it."""
        order = epoch_shard_order(len(self.shards), self.seed, epoch)
        shards = [self.shards[i] for i in order]
        ends = list(itertools.accumulate(s.samples for s in shards))
        worker_counts = [worker_batches(self.steps_per_epoch, num_workers, w)[1] * self.batch_size
                         for w in range(num_workers)]
        reader = self.rank * num_workers + worker
        spans = reader_parts(worker_counts * self.world_size, reader, self.interleave)
        n = worker_counts[worker]
        return ReaderPlan(parts=[run_segments(shards, ends, start, start + count) for start, count in spans],
                          samples=n, shuffle=BufferedShuffle(n, self.shuffle_buffer, np.random.default_rng(
                              [_BUFFER, self.seed, epoch, self.rank, worker])))

    def _read_parts(self, parts: list[list[Segment]], n: int, keep: set[int],
                    start: int) -> Iterator[tuple[int, Sample]]:
        """(reader position, sample) for the positions in ``keep`` or from ``start`` on, in position
        order: the parts are read side by side, each opening only the shards that hold some."""
        keep_in: list[set[int]] = [set() for _ in parts]
        for pos in keep:
            part, index = part_of(pos, n, len(parts))
            keep_in[part].add(index)
        cursors = [self._cursor(self._read(segments, keep_in[part], first_index_from(part, start, n, len(parts))),
                                part, n, len(parts))
                   for part, segments in enumerate(parts)]
        return heapq.merge(*cursors, key=lambda item: item[0])

    @staticmethod
    def _cursor(samples: Iterator[tuple[int, Sample]], part: int, n: int,
                parts: int) -> Iterator[tuple[int, Sample]]:
        """The (index in part, sample) pairs of one part as (reader position, sample)."""
        for index, sample in samples:
            yield reader_index(part, index, n, parts), sample

    def _read(self, segments: list[Segment], keep: set[int], start: int) -> Iterator[tuple[int, Sample]]:
        """(position in the part, sample) for the positions in ``keep`` or from ``start`` on, opening only
        the shards that hold some; a resumed worker skips the shards it has consumed entirely."""
        for seg in segments:
            end = seg.pos + seg.count
            wanted = [p for p in keep if seg.pos <= p < end]
            if end <= start and not wanted:
                continue
            last = end - 1 if end > start else max(wanted)
            for index, sample in enumerate(read_shard(seg.shard.path)):
                if index < seg.first:
                    continue
                pos = seg.pos + index - seg.first
                if pos >= start or pos in keep:
                    yield pos, sample
                if pos == last:
                    break
            else:
                raise RuntimeError(f"{seg.shard.path} holds fewer samples than the {seg.shard.samples} its "
                                   "index.json lists: the shard is damaged; rerun `medssl ingest` on that output")

    def _decode(self, sample: Sample, epoch: int, restore_rngs: bool) -> dict:
        if self.pixels == "stored":
            return {"key": sample.key, "meta": sample.meta, "values": decode_stored(sample.pixels, sample.meta),
                    "seed": sample_seed(self.seed, epoch, sample.key)}
        values = decode_pixels(sample.pixels, sample.meta)
        if self.transform is not None:
            with seeded_global_rngs(sample_seed(self.seed, epoch, sample.key), restore=restore_rngs):
                values = self.transform(values, sample.meta["intensity"]["semantics"])
        return {"key": sample.key, "meta": sample.meta, "values": values}


class ShardLoader:
    """Batches of a ``ShardStream`` from a torch DataLoader, counted into the stream's position.

    Iterating it continues the stream's epoch from its position; after a complete epoch the stream
    moves to the start of the next (also when the position was saved after an epoch's last batch and
    restored). So a training loop that iterates it again and again reads every epoch once, in order,
    whatever it does with the batches, without calling ``set_epoch``. ``persistent_workers`` is
    refused (workers would keep the epoch they started with) and so is ``in_order=False`` (resume
    relies on the DataLoader's batch order).
    """

    def __init__(self, stream: ShardStream, **kwargs):
        if kwargs.get("persistent_workers") or kwargs.get("in_order") is False:
            raise ValueError("ShardLoader needs persistent_workers=False and in_order=True")
        self.stream = stream
        kwargs.setdefault("collate_fn", collate_samples)
        self._loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=stream.num_workers, **kwargs)

    def __len__(self) -> int:
        """Batches left in the current epoch (``stream.steps_per_epoch`` for a whole one)."""
        return self.stream.steps_per_epoch - self.stream.consumed // self.stream.batch_size

    def __iter__(self) -> Iterator:
        stream = self.stream
        if stream.consumed == stream.samples_per_rank:  # nothing left of this epoch: start the next
            stream.set_epoch(stream.epoch + 1)
        for batch in self._loader:
            stream.consumed += stream.batch_size
            yield batch
        if stream.consumed == stream.samples_per_rank:
            stream.set_epoch(stream.epoch + 1)
