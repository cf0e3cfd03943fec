"""``medssl curate``: drop near-duplicate slices of ingest outputs before pretraining.

phash.py (a 64-bit perceptual hash of each sample as displayed) -> near.py (keep or drop, greedy, with
a bounded near-neighbour search over the kept hashes) -> run.py (the two streaming passes, the new
shards, manifest and drop list) -> report.py (counts only).
"""

from medssl.curate.run import curate

__all__ = ["curate"]
