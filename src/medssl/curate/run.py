"""``curate``: ingest outputs -> a new dataset of the same format without near-duplicate slices.

Two passes over the shards, streaming (one sample in memory at a time):
1. hash every sample (``phash.py``) and note its series, plane, frame and modality as small integers;
2. decide (``near.py``) in a fixed visiting order, then copy the kept samples, byte for byte, into new
   shards, one per input shard (same order, so a shard's series mix is what ingest made it).

A sample's series is its DICOM series (the salted ``linkage.series`` hash) or, without one, its source
file (a NIfTI volume, a multi-frame file, a 2D image). Visiting order: series after series (sorted by
that pseudonymous id), within a series by plane and slice index. A near-copy in the same series is a
``series_*`` drop (neighbouring slices that barely differ), in another series an ``archive_*`` drop (the
same image exported twice, a study sent to two archives); ``*_identical`` means the same hash.
Single-file DICOM slices carry no slice position in the shards, so their series is visited in storage
order: which of two near-identical slices stays is arbitrary but fixed.

Output folder (readable wherever an ingest output is: pretrain, embed, export's lineage):

    curate.json            settings and inputs (each input's index.json digest): a rerun must match
    work/                  the first pass's result (hashes.npz, keys.bin): a rerun does not hash again
    shards/NN-<name>.tar   the kept samples of input folder NN's shard <name>
    manifest/chunk-NN-*    the input manifests, dropped samples removed (fully dropped files: status curated)
    drops.jsonl            one row per dropped sample: key, reason, distance, the key of the kept sample
    index.json             written once the shards are: what readers see
    report.json, report.md counts only (by reason, modality, series): no key, no path, no identifier

Every shard is written atomically, so an interrupted run is restarted by the same command: it keeps the
finished shards (the decisions are a function of the hashes and the settings) and writes the rest.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard
from tqdm import tqdm

from medssl import storage
from medssl.artifacts import INDEX, DatasetIndex
from medssl.atomic import atomic_open, atomic_write_text, remove_stale_tmp
from medssl.config import ConfigError, CurateConfig
from medssl.curate.near import decide
from medssl.curate.phash import sample_hash
from medssl.curate.report import build_report, render_markdown
from medssl.shard_format import read_shard, write_shard

FORMAT = "medssl-curate/1"
KEY_BYTES = 32          # keys are "<20 hex>-<plane letter><frame>": 27 characters; a longer one is an error
PLANES = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class InputShard:
    folder: int           # position of its ingest output among the inputs
    path: str | Path
    name: str
    samples: int
    first: int            # number of its first sample in the input order

    @property
    def out_name(self) -> str:
        return f"{self.folder:02d}-{self.name}"


def _input_shards(folders: list[str | Path]) -> tuple[list[InputShard], list[str]]:
    """The shards of the inputs in their index.json order, and each index.json's SHA-256."""
    shards, digests, first = [], [], 0
    for k, folder in enumerate(folders):
        index_file = storage.join(folder, INDEX)
        if not storage.exists(index_file):
            raise ConfigError(f"{folder} has no index.json: pass folders written by `medssl ingest`")
        text = storage.read_text(index_file)
        digests.append(hashlib.sha256(text.encode()).hexdigest())
        for s in DatasetIndex.parse(text, index_file).shards:
            shards.append(InputShard(k, storage.join(folder, "shards", s.name), s.name, s.samples, first))
            first += s.samples
    return shards, digests


def _check_out(out: Path, record: dict, inputs: list[str | Path]) -> None:
    """The output folder is new, or an earlier curate of the same inputs with the same settings."""
    if any(Path(str(f)).resolve() == out.resolve() for f in inputs):
        raise ConfigError(f"--out {out} is one of the inputs: curate writes a new dataset")
    state = out / "curate.json"
    if state.is_file():
        earlier = json.loads(state.read_text())
        if earlier != record:
            changed = [k for k in record if earlier.get(k) != record[k]]
            raise ConfigError(f"{out} was curated with other {' and '.join(changed)}: choose another --out or "
                              "delete it")
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no curate.json: choose a new or empty folder for --out")


@dataclass
class Hashes:
    """The first pass: one row per input sample, in input order (keys stay on disk, in keys.bin)."""

    hash: np.ndarray        # uint64 perceptual hash
    series: np.ndarray      # int64: rank of the series id among the sorted ids
    plane: np.ndarray       # uint8: index in PLANES (3: other)
    frame: np.ndarray       # int64: slice / frame index in the source
    modality: np.ndarray    # uint8: index in modalities
    modalities: list[str]

    def save(self, path: Path) -> None:
        with atomic_open(path, "wb") as f:
            np.savez(f, hash=self.hash, series=self.series, plane=self.plane, frame=self.frame,
                     modality=self.modality, modalities=np.array(self.modalities, dtype=str))

    @classmethod
    def load(cls, path: Path) -> Hashes:
        with np.load(path) as z:
            return cls(z["hash"], z["series"], z["plane"], z["frame"], z["modality"], [str(m) for m in z["modalities"]])


def _hash_pass(shards: list[InputShard], cfg: CurateConfig, work: Path, show_progress: bool) -> Hashes:
    total = sum(s.samples for s in shards)
    hashes = np.zeros(total, np.uint64)
    series = np.zeros(total, np.int64)
    plane = np.zeros(total, np.uint8)
    frame = np.zeros(total, np.int64)
    modality = np.zeros(total, np.uint8)
    series_ids: dict[str, int] = {}     # one entry per series, not per sample
    modalities: dict[str, int] = {}
    bar = tqdm(total=total, desc="hashing", unit="img", disable=not show_progress)
    with atomic_open(work / "keys.bin", "wb") as keys:
        for shard in shards:
            n = 0
            for sample in read_shard(shard.path):
                if n == shard.samples:
                    raise ValueError(f"{shard.path} holds more samples than its index.json lists ({shard.samples}): "
                                     "the dataset is damaged")
                i = shard.first + n
                meta = sample.meta
                try:
                    hashes[i] = sample_hash(sample, cfg.ct_window)
                except (ValueError, KeyError, zstandard.ZstdError, OSError) as e:
                    raise ValueError(f"{shard.path}: sample {sample.key} cannot be decoded ({type(e).__name__}: {e}); "
                                     "the dataset is damaged") from None
                sid = meta.get("linkage", {}).get("series") or meta["source"]["sha256"]
                series[i] = series_ids.setdefault(sid, len(series_ids))
                p = meta["source"].get("plane")
                plane[i] = PLANES.index(p) if p in PLANES else len(PLANES)
                frame[i] = int(meta["source"].get("frame") or 0)
                modality[i] = modalities.setdefault(str(meta.get("modality")), len(modalities))
                keys.write(_fixed_key(sample.key, shard))
                n += 1
                bar.update()
            if n != shard.samples:
                raise ValueError(f"{shard.path} holds {n} samples, its index.json lists {shard.samples}: the dataset "
                                 "is damaged")
    bar.close()
    if len(modalities) > 255:
        raise ValueError(f"{len(modalities)} modalities: more than curate's report can count (255)")
    # Series numbered by their sorted ids: the visiting order does not depend on how ingest sharded them.
    rank = np.empty(len(series_ids), np.int64)
    rank[[series_ids[s] for s in sorted(series_ids)]] = np.arange(len(series_ids))
    return Hashes(hashes, rank[series], plane, frame, modality, list(modalities))


def _fixed_key(key: str, shard: InputShard) -> bytes:
    raw = key.encode()
    if len(raw) > KEY_BYTES:
        raise ValueError(f"{shard.path}: a sample key is longer than {KEY_BYTES} bytes: not a medssl ingest key")
    return raw.ljust(KEY_BYTES, b"\0")


def _keys(work: Path, n: int) -> np.ndarray:
    """The sample keys as a read-only array on disk ('S32', NUL-padded)."""
    return (np.memmap(work / "keys.bin", dtype=f"S{KEY_BYTES}", mode="r", shape=(n,)) if n
            else np.empty(0, f"S{KEY_BYTES}"))


def visit_order(h: Hashes) -> np.ndarray:
    """Series by series (sorted ids), then plane, slice index and storage position."""
    return np.lexsort((np.arange(len(h.hash)), h.frame, h.plane, h.series))


def reasons(h: Hashes, duplicate_of: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Reason code per sample: 0 kept, then REASONS[code - 1]."""
    dropped = duplicate_of >= 0
    code = np.zeros(len(duplicate_of), np.uint8)
    same_series = np.zeros(len(duplicate_of), bool)
    same_series[dropped] = h.series[duplicate_of[dropped]] == h.series[dropped]
    code[dropped] = 1 + 2 * (~same_series[dropped]) + (distance[dropped] > 0)
    return code


REASONS = ("series_identical", "series_near", "archive_identical", "archive_near")


def _write_shards(shards: list[InputShard], kept: np.ndarray, out: Path, show_progress: bool) -> list[dict]:
    """Copy each input shard's kept samples into its output shard (skipping finished ones); the index rows."""
    rows = []
    for shard in tqdm(shards, desc="writing", unit="shard", disable=not show_progress):
        mask = kept[shard.first:shard.first + shard.samples]
        n_kept = int(mask.sum())
        if n_kept == 0:
            continue
        path = out / "shards" / shard.out_name
        if not path.is_file():
            # A generator: one sample in memory at a time (a shard of 512-px CT slices holds ~0.5 GB).
            write_shard(path, (s for s, keep in zip(read_shard(shard.path), mask) if keep))
        rows.append({"name": shard.out_name, "samples": n_kept, "bytes": path.stat().st_size})
    return rows


def _write_manifest(folders: list[str | Path], shards: list[InputShard], keys: np.ndarray, kept: np.ndarray,
                    out: Path) -> int:
    """Each input manifest part with the dropped samples taken out; returns the kept samples it lists.

    Dropped keys are taken per input: two ingests of the same files (say at two sizes) hold the same keys,
    and a sample dropped from one must not be taken out of the other's manifest."""
    folder_of = np.zeros(len(kept), dtype=np.int64)
    for s in shards:
        folder_of[s.first:s.first + s.samples] = s.folder
    out_names = {(s.folder, s.name): s.out_name for s in shards}
    listed = 0
    for k, folder in enumerate(folders):
        dropped_keys = np.sort(np.asarray(keys[(~kept) & (folder_of == k)]))
        manifest = storage.join(folder, "manifest")
        for part in sorted(n for n in storage.listdir(manifest) if n.startswith("chunk-") and n.endswith(".jsonl")):
            rows = [json.loads(line) for line in storage.read_text(storage.join(manifest, part)).splitlines() if line]
            for row in rows:
                if row.get("samples"):
                    keep = ~_is_in(np.array(row["samples"], dtype=f"S{KEY_BYTES}"), dropped_keys)
                    row["samples"] = [s for s, ok in zip(row["samples"], keep) if ok]
                    row["shards"] = [out_names[(k, name)] for name, ok in zip(row.get("shards", []), keep) if ok]
                    listed += len(row["samples"])
                    if not row["samples"]:
                        row["status"], row["reason"] = "curated", "every sample a near-duplicate (see drops.jsonl)"
            text = "".join(json.dumps(row) + "\n" for row in rows)
            atomic_write_text(out / "manifest" / f"chunk-{k:02d}-{part.removeprefix('chunk-')}", text)
    return listed


def _is_in(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def _write_drops(h: Hashes, keys: np.ndarray, duplicate_of: np.ndarray, distance: np.ndarray, code: np.ndarray,
                 out: Path) -> None:
    with atomic_open(out / "drops.jsonl", "w") as f:
        for i in np.flatnonzero(duplicate_of >= 0).tolist():
            f.write(json.dumps({"key": keys[i].decode(), "reason": REASONS[code[i] - 1], "distance": int(distance[i]),
                                "kept": keys[duplicate_of[i]].decode()}) + "\n")


def curate(cfg: CurateConfig, show_progress: bool = True) -> dict:
    """Curate ``cfg.shards`` into ``cfg.out``; returns the report (also report.json). Reruns are safe."""
    if not cfg.shards:
        raise ConfigError("no inputs: give one or more `medssl ingest` output folders")
    if cfg.out is None or storage.is_url(cfg.out):
        raise ConfigError("curate needs a local output folder (--out DIR)")
    out = Path(cfg.out)
    folders = [storage.location(f) for f in cfg.shards]
    shards, digests = _input_shards(folders)
    record = {"format": FORMAT, "settings": {"threshold": cfg.threshold, "ct_window": list(cfg.ct_window)},
              "inputs": [{"folder": str(f), "index_sha256": d} for f, d in zip(folders, digests)]}
    _check_out(out, record, folders)
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())   # finished earlier with the same inputs and settings
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out, ("", "shards", "manifest", "work"))
    atomic_write_text(out / "curate.json", json.dumps(record, indent=1))
    work = out / "work"
    work.mkdir(exist_ok=True)

    t0 = time.perf_counter()
    if (work / "hashes.npz").is_file():
        h = Hashes.load(work / "hashes.npz")
    else:
        h = _hash_pass(shards, cfg, work, show_progress)
        h.save(work / "hashes.npz")
    t_hash = time.perf_counter() - t0
    duplicate_of, distance = decide(h.hash, visit_order(h), cfg.threshold)
    code = reasons(h, duplicate_of, distance)
    kept = duplicate_of < 0
    t_decide = time.perf_counter() - t0 - t_hash

    keys = _keys(work, len(h.hash))
    index_rows = _write_shards(shards, kept, out, show_progress)
    listed = _write_manifest(folders, shards, keys, kept, out)
    if listed != int(kept.sum()):
        raise ValueError(f"the input manifests list {listed} of the {int(kept.sum())} kept samples: the inputs' "
                         "manifests and shards disagree (rerun `medssl ingest` on them to repair)")
    _write_drops(h, keys, duplicate_of, distance, code, out)
    DatasetIndex.model_validate({"samples": int(kept.sum()), "shards": index_rows}).write(out / INDEX)
    seconds = {"hash": round(t_hash, 2), "decide": round(t_decide, 2), "total": round(time.perf_counter() - t0, 2)}
    report = build_report(h, code, distance, REASONS, record["settings"], seconds, len(index_rows))
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report

