"""Which samples to keep: a greedy pass over 64-bit hashes with a bounded near-neighbour search.

Rule: samples are visited in a fixed order (series by series, slices in order; see ``run.visit_order``);
a sample is dropped if an already *kept* sample lies within ``threshold`` bits of it, else it is kept.
So of a run of near-identical slices the first stays, and a slow drift through a volume keeps one slice
every ``threshold`` bits of change (clustering by connected pairs would merge a whole volume into one).

The kept hashes are indexed by multi-index hashing (Norouzi et al. 2012): the 64 bits are cut into 4
bands of 16; two hashes within ``t`` bits agree to within ``t // 4`` bits on at least one band
(pigeonhole), so a query looks up, in each band's table, its own band value and every value within
``t // 4`` bits of it (1, 17 or 137 values for t < 4, < 8, < 12), and checks the full distance only for
those candidates. An exact copy is found with one lookup per band. Cost per sample: a bounded number of
table lookups, not a scan of the archive. Memory: the kept hashes (8 bytes each) and their sample
numbers (8 bytes), once per band, in flat arrays; tables of at most 65,536 entries.
"""

from __future__ import annotations

import itertools
from array import array

import numpy as np

BANDS = 4
BAND_BITS = 64 // BANDS
# band radius 2 (137 lookups per band); a pHash distance above ~10 of 64 is no longer "near-identical"
MAX_THRESHOLD = 11


def _flip_masks(bits: int, radius: int) -> list[int]:
    """Every ``bits``-wide value with at most ``radius`` bits set: XOR-ed onto a band value, the values
    within ``radius`` bits of it."""
    return [sum(1 << b for b in chosen) for r in range(radius + 1) for chosen in itertools.combinations(range(bits), r)]


class NearIndex:
    """Kept hashes, searchable for the nearest one within ``threshold`` bits."""

    def __init__(self, threshold: int):
        if not 0 <= threshold <= MAX_THRESHOLD:
            raise ValueError(f"threshold {threshold} is outside 0..{MAX_THRESHOLD} bits")
        self.threshold = threshold
        self._masks = _flip_masks(BAND_BITS, threshold // BANDS)
        # band -> band value -> (hashes, sample numbers) of the kept samples with that band value
        self._tables: list[dict[int, tuple[array, array]]] = [{} for _ in range(BANDS)]

    @staticmethod
    def _bands(h: int) -> list[int]:
        return [(h >> (BAND_BITS * b)) & ((1 << BAND_BITS) - 1) for b in range(BANDS)]

    def add(self, h: int, sample: int) -> None:
        for table, value in zip(self._tables, self._bands(h)):
            hashes, samples = table.setdefault(value, (array("Q"), array("q")))
            hashes.append(h)
            samples.append(sample)

    def nearest(self, h: int) -> tuple[int, int] | None:
        """(sample number, distance) of the nearest kept hash within the threshold, or None. Ties go to
        the first found: deterministic for a given visiting order."""
        best: tuple[int, int] | None = None   # (distance, sample)
        for table, value in zip(self._tables, self._bands(h)):
            for mask in self._masks:
                hit = table.get(value ^ mask)
                if hit is not None:
                    found = _closest(h, *hit)
                    if found[0] <= self.threshold and (best is None or found < best):
                        best = found
        return None if best is None else (best[1], best[0])


def _closest(h: int, hashes: array, samples: array) -> tuple[int, int]:
    """(distance, sample) of the hash in a bucket nearest to ``h``. Most buckets hold a few hashes: plain
    ints then (a numpy call costs ~5 us, a popcount of two ints ~0.1 us); numpy for large ones."""
    if len(hashes) < 64:
        return min(((k ^ h).bit_count(), s) for k, s in zip(hashes, samples))
    distances = np.bitwise_count(np.frombuffer(hashes, np.uint64) ^ np.uint64(h))
    i = int(np.argmin(distances))
    return int(distances[i]), samples[i]


def decide(hashes: np.ndarray, order: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep or drop each sample, visiting them in ``order``. Returns (duplicate_of, distance) per sample:
    ``duplicate_of`` is -1 for a kept sample, else the number of the kept sample it nearly repeats."""
    index = NearIndex(threshold)
    duplicate_of = np.full(len(hashes), -1, dtype=np.int64)
    distance = np.zeros(len(hashes), dtype=np.uint8)
    for i in order.tolist():
        h = int(hashes[i])
        hit = index.nearest(h)
        if hit is None:
            index.add(h, i)
        else:
            duplicate_of[i], distance[i] = hit
    return duplicate_of, distance
