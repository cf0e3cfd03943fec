"""ShardStream: rank/worker split, seeded epochs, bounded buffer, exact mid-epoch resume (data/stream.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medssl.data.stream as stream_module
from medssl.config import IngestConfig
from medssl.data.stream import BufferedShuffle, ShardStream, collate_stored, sample_seed
from medssl.ingest import ingest
from medssl.shard_format import decode_pixels, decode_stored, read_shard

# Two archives of 11 and 7 images; 4 files per work unit and 3 samples per shard give uneven shards
# (3, 1, 3, 1, 3 and 3, 1, 3): 18 samples in 8 shards.
ARCHIVE_SIZES = (11, 7)
TOTAL = sum(ARCHIVE_SIZES)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("stream")
    (base / "salt").write_text("stream-test-salt-0123456789abcdef")
    outs, image = [], 0
    for n in ARCHIVE_SIZES:
        folder = base / f"in{len(outs)}"
        folder.mkdir()
        for _ in range(n):  # distinct content: ingest drops duplicates
            Image.fromarray((np.arange(64).reshape(8, 8) * 3 + image * 7).astype(np.uint8)).save(
                folder / f"{image}.png")
            image += 1
        out = base / f"out{len(outs)}"
        ingest(IngestConfig(inputs=[folder], out=out, workers=1, files_per_chunk=4, samples_per_shard=3,
                            salt_file=base / "salt"), show_progress=False)
        outs.append(out)
    return outs


def all_keys(archives: list[Path]) -> set[str]:
    return {s.key for out in archives for shard in (out / "shards").glob("*.tar") for s in read_shard(shard)}


def keys(stream: ShardStream) -> list[str]:
    return [s["key"] for s in stream]


def noisy(values: np.ndarray, semantics: str) -> np.ndarray:
    """A transform drawing from torch's and numpy's global generators, like a real augmentation."""
    return values + torch.rand(1).item() + np.random.rand()


def test_fixture_has_uneven_shards(archives):
    stream = ShardStream(archives)
    assert stream.total == TOTAL and len(stream.shards) == 8
    assert len({s.samples for s in stream.shards}) > 1  # uneven: the stream must not assume equal shards


@pytest.mark.parametrize("batch_size", [1, 4])
def test_ranks_and_workers_split_an_epoch_without_duplicates(archives, batch_size):
    seen, batches_per_rank = [], []
    for rank in range(2):
        stream = ShardStream(archives, batch_size=batch_size, num_workers=2, rank=rank, world_size=2,
                             shuffle_buffer=3, seed=5)
        stream.set_epoch(2)
        batches = [b["key"] for b in stream.loader()]
        assert all(len(b) == batch_size for b in batches)
        batches_per_rank.append(len(batches))
        seen += [k for b in batches for k in b]
    # DDP needs equal step counts; what is dropped is less than world_size * batch_size samples.
    assert batches_per_rank[0] == batches_per_rank[1] == TOTAL // 2 // batch_size
    assert len(seen) == len(set(seen)) and set(seen) <= all_keys(archives)
    dropped = TOTAL - len(seen)
    assert dropped == (0 if batch_size == 1 else 2) and dropped < 2 * batch_size


def test_a_single_rank_reads_every_sample(archives):
    single = ShardStream(archives)
    assert sorted(keys(single)) == sorted(all_keys(archives))
    assert (single.rank, single.world_size) == (0, 1)  # torch.distributed is not initialised here


def test_seeded_epochs(archives):
    def order(seed: int, epoch: int) -> list[str]:
        stream = ShardStream(archives, seed=seed, shuffle_buffer=4)
        stream.set_epoch(epoch)
        return keys(stream)

    first = order(0, 0)
    assert order(0, 0) == first
    assert sorted(order(0, 1)) == sorted(first) and order(0, 1) != first
    assert order(1, 0) != first


def test_buffered_shuffle_is_bounded_and_shuffles():
    shuffle = BufferedShuffle(100, 8, np.random.default_rng(0))
    out = []
    for pos in shuffle:
        out.append(pos)
        assert len(shuffle.buffer) <= 8 and shuffle.pulled - len(out) <= 8
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert list(BufferedShuffle(20, 1, np.random.default_rng(0))) == list(range(20))


def test_stream_holds_at_most_the_buffer_and_one_sample_per_part(archives, monkeypatch):
    kept = 0  # samples a part handed on (the samples skipped to reach a part's start are dropped at once)
    read_part = ShardStream._read

    def counting_read(self, segments, keep, start):
        nonlocal kept
        for item in read_part(self, segments, keep, start):
            kept += 1
            yield item

    monkeypatch.setattr(ShardStream, "_read", counting_read)
    yielded = 0
    for _ in ShardStream(archives, shuffle_buffer=4, interleave=3):
        yielded += 1
        assert kept - yielded <= 4 + 1 + 3
    assert yielded == TOTAL


def test_samples_are_decoded_values_with_metadata(archives):
    stored = {s.key: s for out in archives for shard in (out / "shards").glob("*.tar") for s in read_shard(shard)}
    for sample in ShardStream(archives):
        expected = stored[sample["key"]]
        assert sample["meta"] == expected.meta
        assert sample["values"].dtype == np.float32 and sample["values"].shape == (8, 8)
        np.testing.assert_array_equal(sample["values"], decode_pixels(expected.pixels, expected.meta))


def test_stored_pixels_come_with_the_seed_the_transform_would_get(archives):
    """pixels="stored" (crops on the training device): uint16 stored values, and the per-sample seed."""
    stored = {s.key: s for out in archives for shard in (out / "shards").glob("*.tar") for s in read_shard(shard)}
    stream = ShardStream(archives, seed=5, pixels="stored")
    stream.set_epoch(2)
    samples = list(stream)
    assert len(samples) == TOTAL
    for sample in samples:
        expected = stored[sample["key"]]
        assert sample["values"].dtype == np.uint16
        np.testing.assert_array_equal(sample["values"], decode_stored(expected.pixels, expected.meta))
        assert sample["seed"] == sample_seed(5, 2, sample["key"])
    with pytest.raises(ValueError, match="transform takes values"):
        ShardStream(archives, pixels="stored", transform=noisy)


def test_collate_stored_puts_images_of_any_size_on_one_canvas():
    images = [np.full((3, 5), 65535, np.uint16), np.arange(8, dtype=np.uint16).reshape(4, 2)]
    batch = collate_stored([{"key": str(i), "meta": {}, "values": v, "seed": 10 + i} for i, v in enumerate(images)])
    canvas = batch["values"].numpy().view(np.uint16)  # int16 with the uint16 bits
    assert canvas.shape == (2, 4, 5) and batch["sizes"].tolist() == [[3, 5], [4, 2]] and batch["seeds"] == [10, 11]
    for image, plane in zip(images, canvas):
        np.testing.assert_array_equal(plane[: image.shape[0], : image.shape[1]], image)
        assert plane.sum() == image.sum()  # zeros elsewhere


@pytest.mark.parametrize(("num_workers", "batch_size", "stop_after"), [(2, 1, 5), (2, 2, 3), (0, 2, 2)])
def test_resume_mid_epoch_gives_the_remaining_batches(archives, num_workers, batch_size, stop_after):
    def make() -> ShardStream:
        s = ShardStream(archives, batch_size=batch_size, num_workers=num_workers, rank=1, world_size=2,
                        shuffle_buffer=3, transform=noisy, seed=3)
        s.set_epoch(1)
        return s

    uninterrupted = list(make().loader())

    first = make()
    loader = first.loader()
    for _, _ in zip(range(stop_after), loader):
        pass
    state = first.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == stop_after * batch_size

    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed.loader())
    assert [b["key"] for b in rest] == [b["key"] for b in uninterrupted[stop_after:]]
    for got, want in zip(rest, uninterrupted[stop_after:]):
        torch.testing.assert_close(got["values"], want["values"], rtol=0, atol=0)  # same augmentations too
    assert (resumed.epoch, resumed.consumed) == (2, 0)  # a finished epoch moves on to the next


def test_resume_does_not_reread_consumed_shards(archives, monkeypatch):
    opened = []

    def recording_read_shard(path):
        opened.append(path)
        return read_shard(path)

    monkeypatch.setattr(stream_module, "read_shard", recording_read_shard)
    full = keys(ShardStream(archives, shuffle_buffer=2))
    n_full = len(opened)
    opened.clear()
    stream = ShardStream(archives, shuffle_buffer=2)
    stream.load_state_dict({**stream.state_dict(), "consumed": 14})
    assert keys(stream) == full[14:]
    assert len(opened) < n_full


def test_transform_leaves_the_callers_random_state_alone(archives):
    torch.manual_seed(0)
    np.random.seed(0)
    expected = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    list(ShardStream(archives, transform=noisy))
    assert (torch.rand(1), np.random.rand()) == expected


def test_resume_with_another_layout_is_refused(archives):
    two_ranks = ShardStream(archives, rank=0, world_size=2)
    one_rank = ShardStream(archives)
    with pytest.raises(ValueError, match="world_size: 2 -> 1"):
        one_rank.load_state_dict({**two_ranks.state_dict(), "consumed": 3})
    one_rank.load_state_dict({**two_ranks.state_dict(), "epoch": 4})  # an epoch's start is fine
    assert (one_rank.epoch, one_rank.consumed) == (4, 0)
    with pytest.raises(ValueError, match="whole number of batches"):
        ShardStream(archives, batch_size=2).load_state_dict({**ShardStream(archives, batch_size=2).state_dict(),
                                                             "consumed": 3})


def test_clear_errors(archives, tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        ShardStream(tmp_path)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ShardStream(archives, batch_size=10, world_size=2, rank=0)


def round_robin(stream: ShardStream, num_workers: int) -> list[list[str]]:
    """The batches a DataLoader with ``num_workers`` workers hands out: batch j from worker j % num_workers
    while it has batches (what torch's in-order DataLoader does), simulated without processes."""
    consumed_batches = stream.consumed // stream.batch_size
    streams = [stream._iterate(stream.epoch, consumed_batches, (w + consumed_batches) % num_workers, num_workers,
                               in_worker=True) for w in range(num_workers)]
    batches, active = [], list(range(num_workers))
    while active:
        for w in list(active):
            batch = [s["key"] for _, s in zip(range(stream.batch_size), streams[w])]
            if len(batch) < stream.batch_size:
                assert not batch, "a worker ended inside a batch"
                active.remove(w)
            else:
                batches.append(batch)
    return batches


def test_split_and_resume_over_many_layouts(monkeypatch):
    """Many shard sizes, rank counts, worker counts, batch sizes and resume points, on synthetic shards."""
    from medssl.data.stream import Shard
    from medssl.shard_format import Sample

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, 30)
    shards = [Shard(Path(f"s{i}"), int(n)) for i, n in enumerate(sizes)]
    monkeypatch.setattr(stream_module, "list_shards", lambda roots: shards)
    monkeypatch.setattr(stream_module, "read_shard",
                        lambda path: (Sample(f"{path}-{i}", b"", {}) for i in range(int(sizes[int(str(path)[1:])]))))
    monkeypatch.setattr(ShardStream, "_decode", lambda self, sample, epoch, restore_rngs: {"key": sample.key})
    total = int(sizes.sum())
    for _ in range(25):
        world, workers, batch, buffer, parts = (int(x) for x in rng.integers(1, [5, 5, 7, 10, 9]))
        seen = []
        for rank in range(world):
            def make() -> ShardStream:
                s = ShardStream([], batch_size=batch, num_workers=workers, rank=rank, world_size=world,
                                shuffle_buffer=buffer, interleave=parts, seed=7)
                s.set_epoch(3)
                return s

            stream = make()
            full = round_robin(stream, workers)
            assert len(full) == stream.steps_per_epoch == total // world // batch
            seen += [k for b in full for k in b]
            stop = int(rng.integers(0, len(full) + 1))
            resumed = make()
            resumed.load_state_dict({**resumed.state_dict(), "consumed": stop * batch})
            assert round_robin(resumed, workers) == full[stop:]
        assert len(seen) == len(set(seen)) and total - len(seen) < world * batch


def test_a_position_saved_after_the_last_batch_goes_on_with_the_next_epoch(archives):
    """A checkpoint taken right after an epoch's last batch holds (epoch, all consumed); iterating a loader on
    the restored stream reads the next epoch, not an empty one (a loop that never calls set_epoch relies on it)."""
    def make() -> ShardStream:
        return ShardStream(archives, batch_size=2, num_workers=2, shuffle_buffer=3, seed=3)

    resumed = make()
    resumed.load_state_dict({**resumed.state_dict(), "consumed": resumed.samples_per_rank})
    following = make()
    following.set_epoch(1)
    assert [b["key"] for b in resumed.loader()] == [b["key"] for b in following.loader()]
    assert (resumed.epoch, resumed.consumed) == (2, 0)


# 40 series of 12 slices in folder order, written as ingest does: shards of 48 samples, 4 series each.
SERIES, SLICES, SHARD_SAMPLES = 40, 12, 48


@pytest.fixture
def series_shards(monkeypatch):
    """Synthetic shards whose sample keys are ``<series>-<slice>``, without files."""
    from medssl.data.stream import Shard
    from medssl.shard_format import Sample

    n_shards = SERIES * SLICES // SHARD_SAMPLES
    monkeypatch.setattr(stream_module, "list_shards",
                        lambda roots: [Shard(Path(str(i)), SHARD_SAMPLES) for i in range(n_shards)])

    def read(path):
        first = int(str(path)) * SHARD_SAMPLES
        return (Sample(f"{g // SLICES}-{g % SLICES}", b"", {}) for g in range(first, first + SHARD_SAMPLES))

    monkeypatch.setattr(stream_module, "read_shard", read)
    monkeypatch.setattr(ShardStream, "_decode", lambda self, sample, epoch, restore_rngs: {"key": sample.key})


def mean_same_series_share(interleave: int) -> float:
    shares = []
    for epoch in range(4):
        stream = ShardStream([], batch_size=16, num_workers=2, shuffle_buffer=32, interleave=interleave, seed=1)
        stream.set_epoch(epoch)
        for batch in round_robin(stream, 2):
            series = [key.split("-")[0] for key in batch]
            shares.append(sum(series.count(s) * (series.count(s) - 1) for s in set(series)) / (16 * 15))
    return float(np.mean(shares))


def test_batches_mix_series_about_as_a_random_draw(series_shards):
    """Each shard holds 4 whole series, so a reader that streams one run of shards through a 32-sample buffer
    makes batches of a few series (interleave=1, the stream before issue 10: about 7x the i.i.d. share);
    32 parts read side by side bring the batches within 2x of drawing 16 samples at random from all 480."""
    iid = (SLICES - 1) / (SERIES * SLICES - 1)
    assert mean_same_series_share(1) > 4 * iid
    assert mean_same_series_share(32) < 2 * iid


def test_resume_is_exact_at_every_batch_with_interleaved_parts(series_shards):
    def make() -> ShardStream:
        s = ShardStream([], batch_size=8, num_workers=3, shuffle_buffer=20, interleave=5, seed=2, rank=1,
                        world_size=2)
        s.set_epoch(1)
        return s

    full = round_robin(make(), 3)
    assert len(full) == make().steps_per_epoch == SERIES * SLICES // 2 // 8
    for stop in range(len(full) + 1):
        resumed = make()
        resumed.load_state_dict({**resumed.state_dict(), "consumed": stop * 8})
        assert round_robin(resumed, 3) == full[stop:]


def test_resume_with_another_interleave_is_refused(archives):
    state = {**ShardStream(archives, interleave=4).state_dict(), "consumed": 2}
    with pytest.raises(ValueError, match="interleave: 4 -> 8"):
        ShardStream(archives, interleave=8).load_state_dict(state)
