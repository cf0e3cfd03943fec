"""The curate report: what was read, kept and dropped, as counts only.

By reason, by modality, by Hamming distance, and by series (how many series lost how many slices). No
sample key, series id, path or header value appears here: the machine-readable list of dropped keys is
drops.jsonl, beside it.
"""

from __future__ import annotations

import numpy as np

# Series that lost this many slices (lower bounds of the bins).
SERIES_LOSS_BINS = (1, 2, 5, 10, 50)


def _loss_bins(lost: np.ndarray) -> dict[str, int]:
    lost = lost[lost > 0]
    bins = {}
    for lo, hi in zip(SERIES_LOSS_BINS, SERIES_LOSS_BINS[1:] + (None,)):
        label = str(lo) if hi == lo + 1 else (f"{lo}-{hi - 1}" if hi else f"{lo}+")
        bins[label] = int(((lost >= lo) & (lost < hi if hi else True)).sum())
    return bins


def build_report(h, code: np.ndarray, distance: np.ndarray, reasons: tuple[str, ...], settings: dict,
                 seconds: dict, shards: int) -> dict:
    """``h``: the first pass (``run.Hashes``); ``code``: 0 kept, else 1 + index in ``reasons``."""
    dropped = code > 0
    by_modality = {}
    for m, name in enumerate(h.modalities):
        mine = h.modality == m
        by_modality[name] = {"read": int(mine.sum()), "samples": int((mine & ~dropped).sum()),
                             "dropped": {r: int((mine & (code == c)).sum()) for c, r in enumerate(reasons, 1)}}
    n_series = int(h.series.max()) + 1 if len(h.series) else 0
    slices = np.bincount(h.series, minlength=n_series)
    lost = np.bincount(h.series[dropped], minlength=n_series)
    multi = slices > 1
    return {
        "settings": settings,
        "read": int(len(code)),
        "kept": int((~dropped).sum()),
        "dropped": int(dropped.sum()),
        "samples": int((~dropped).sum()),     # = kept; the name readers of an ingest report.json look for
        "shards": shards,
        "by_reason": {r: int((code == c).sum()) for c, r in enumerate(reasons, 1)},
        "by_modality": dict(sorted(by_modality.items())),
        "by_distance": {str(d): int((distance[dropped] == d).sum()) for d in range(settings["threshold"] + 1)},
        "series": {
            "total": n_series,
            "multi_slice": int(multi.sum()),
            "slices_before": int(slices[multi].sum()),
            "slices_after": int((slices - lost)[multi].sum()),
            "lost_slices": int((lost > 0).sum()),
            "lost_all": int(((lost == slices) & (slices > 0)).sum()),
            "by_slices_lost": _loss_bins(lost),
        },
        "seconds": seconds,
    }


def render_markdown(r: dict) -> str:
    s = r["series"]
    pct = 100 * r["dropped"] / r["read"] if r["read"] else 0.0
    lines = [
        "# medssl curate report", "",
        f"Perceptual hash (64-bit DCT pHash), near-identical = at most {r['settings']['threshold']} bits apart; "
        f"CT hashed through the window {r['settings']['ct_window'][0]:g}/{r['settings']['ct_window'][1]:g} HU.", "",
        f"{r['read']} images read: {r['kept']} kept, {r['dropped']} dropped ({pct:.1f}%).", "",
        "| reason | dropped |", "| --- | ---: |",
        *(f"| {k} | {v} |" for k, v in r["by_reason"].items()), "",
        "series_*: a near-copy of a kept slice of the same series; archive_*: of a kept image of another series or "
        "file; *_identical: the same hash.", "",
        "| modality | read | kept | " + " | ".join(r["by_reason"]) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in r["by_reason"]) + " |",
        *(f"| {m} | {c['read']} | {c['samples']} | " + " | ".join(str(v) for v in c["dropped"].values()) + " |"
          for m, c in r["by_modality"].items()), "",
        f"Series: {s['total']} ({s['multi_slice']} with more than one slice: {s['slices_before']} slices before, "
        f"{s['slices_after']} after). {s['lost_slices']} series lost slices, {s['lost_all']} lost all of them "
        "(copies of images kept elsewhere).", "",
        "| slices lost | series |", "| --- | ---: |",
        *(f"| {k} | {v} |" for k, v in s["by_slices_lost"].items()), "",
        "Distance of each dropped image to the kept one it repeats (bits): "
        + ", ".join(f"{d}: {n}" for d, n in r["by_distance"].items()) + ".", "",
        f"Time: {r['seconds']['total']:.1f} s (hashing {r['seconds']['hash']:.1f} s).", "",
    ]
    return "\n".join(lines)
