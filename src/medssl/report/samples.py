"""A few shard samples per group (modality or label), shown as the encoder sees them.

Only a bounded number of shards is read (spread evenly over each folder's index), so the report
stays fast on archives of any size; a group found in none of them is simply absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl import intensity
from medssl.artifacts import read_index
from medssl.shard_format import decode_pixels, read_shard

# CT is stored in Hounsfield units; the encoder takes [0, 1]. A soft-tissue window (level 40, width 400)
# is the default view of `medssl finetune` too, so the map shows what a downstream task would feed.
CT_WINDOW = (40.0, 400.0)
MAX_SHARDS = 32


@dataclass
class ShardImage:
    key: str
    modality: str
    group: str
    image: np.ndarray   # (H, W) float32 in [0, 1]


def pick_samples(folders: list[Path], group_of: Callable[[dict], str | None], per_group: int,
                 groups: list[str] | None = None, max_shards: int = MAX_SHARDS) -> list[ShardImage]:
    """Up to ``per_group`` samples of each group; ``group_of(meta)`` names a sample's group (None: skip it).

    With ``groups`` known, reading stops as soon as each of them is full.
    """
    counts: dict[str, int] = {}
    picked: list[ShardImage] = []
    for shard in _spread_shards(folders, max_shards):
        for sample in read_shard(shard):
            group = group_of(sample.meta)
            if group is None or counts.get(group, 0) >= per_group:
                continue
            counts[group] = counts.get(group, 0) + 1
            picked.append(ShardImage(sample.key, sample.meta.get("modality", "?"), group,
                                     to_display(decode_pixels(sample.pixels, sample.meta), sample.meta)))
        if groups is not None and all(counts.get(g, 0) >= per_group for g in groups):
            break
    return picked


def _spread_shards(folders: list[Path], max_shards: int) -> list[Path]:
    shards = []
    for folder in folders:
        names = [s.name for s in read_index(folder).shards]
        shards += [Path(folder) / "shards" / n for n in names]
    if len(shards) <= max_shards:
        return shards
    return [shards[i] for i in np.linspace(0, len(shards) - 1, max_shards).round().astype(int)]


def to_display(values: np.ndarray, meta: dict) -> np.ndarray:
    """Stored values -> [0, 1]: CT through CT_WINDOW, the rest is already in [0, 1]."""
    hounsfield = meta.get("intensity", {}).get("semantics") == "hounsfield"
    return intensity.to_display(values, hounsfield, CT_WINDOW).astype(np.float32)
