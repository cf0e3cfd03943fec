"""``medssl embed``: the encoder's features of every sample of a dataset (or of image files), in Parquet.

Output folder::

    embeddings.json        what was embedded: the run, its encoder, the CT window, the source
    parts/<name>.parquet   one part per shard (files: per FILES_PER_PART files), written atomically

A part's rows: ``key`` (the sample key of ingest), ``source_sha256`` (the source file's content hash),
``modality``, ``frame``, a thumbnail reference (``shard`` + ``offset``: the byte offset of the sample's
first tar member, so one seek finds its pixels), ``path`` (the source file: for a dataset as its
manifest names it, a path relative to its input or with ``redact_paths`` the dataset's salted reference;
for image files the file) and ``embedding`` (the raw features, float32). No identifiers: the shards hold
none, and nothing is read from headers but the modality code. Resume = parts already written are
skipped, so a rerun after a crash finishes the rest.

Inputs are prepared as for fine-tuning (``downstream.decode.fit_square``, ``downstream.images.to_input``):
resized and padded to the encoder's input size, CT through ``ct_window``, one grey channel in [0, 1].
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from medssl import storage
from medssl.artifacts import INDEX, read_index
from medssl.atomic import atomic_open, atomic_write_text
from medssl.config import ConfigError, FinetuneConfig
from medssl.downstream.decode import DecodeSettings, fit_square
from medssl.downstream.images import to_input
from medssl.downstream.model import resolve_device
from medssl.io import Rejected
from medssl.io.isolation import Budget, IsolatedWorker
from medssl.retrieval.files import DecodedFile, decode_file, list_image_files
from medssl.shard_format import decode_pixels, read_shard

FORMAT = "medssl-embeddings/1"
MANIFEST = "embeddings.json"
PARTS = "parts"
FILES_PER_PART = 256
# The fine-tuning default (soft tissue): what a downstream task would feed the encoder.
DEFAULT_CT_WINDOW = FinetuneConfig.model_fields["ct_window"].default


class Encoder:
    """A run's encoder and how to feed it: stored values (HU or [0, 1]) at its input size -> features."""

    def __init__(self, run: str | Path, ct_window: tuple[float, float] = DEFAULT_CT_WINDOW, device: str = "auto",
                 batch_size: int = 64):
        from medssl.models.export import load_encoder

        self.device = resolve_device(device)
        self.model = load_encoder(run).to(self.device)
        card = self.model.model_card
        self.card = {"architecture": card["architecture"], "feature_dim": int(card["feature_dim"]),
                     "input_size": int(card["input_size"]), "steps": card.get("steps")}
        self.input_size = self.card["input_size"]
        self.ct_window = tuple(float(v) for v in ct_window)
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray, is_ct: np.ndarray) -> np.ndarray:
        """(N, S, S) stored values and (N,) CT flags -> (N, D) float32 features, in batches."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = to_input(torch.from_numpy(images[i:i + self.batch_size]),
                         torch.from_numpy(is_ct[i:i + self.batch_size]), self.ct_window)
            out.append(self.model(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.card["feature_dim"]), np.float32)

    def encode_file(self, path: Path, budget: Budget | None = None,
                    worker: IsolatedWorker | None = None) -> tuple[DecodedFile, np.ndarray]:
        """One image file -> (what was decoded, its (D,) features). Raises ``Rejected``."""
        decoded = decode_file(path, self.decode_settings(), budget or self.decode_budget(), worker)
        return decoded, self.features(decoded.values[None], np.array([decoded.is_ct]))[0]

    def decode_settings(self) -> DecodeSettings:
        return DecodeSettings.of(FinetuneConfig(input_size=self.input_size))

    def decode_budget(self) -> Budget:
        cfg = FinetuneConfig()
        return Budget(cfg.file_timeout_s, cfg.max_memory_mb << 20)


@dataclass
class Part:
    name: str
    samples: int                                  # expected (files: the files it holds)
    shard: str | None = None                      # relative to the dataset folder
    files: list[Path] = field(default_factory=list)


@dataclass
class EmbedSummary:
    out: Path
    rows: int = 0
    parts_written: int = 0
    parts_skipped: int = 0
    rejected: list[dict] = field(default_factory=list)  # image files: {"path", "reason"}


def is_dataset(location: str | Path) -> bool:
    return storage.exists(storage.join(location, INDEX))


def plan_parts(inputs: list) -> tuple[dict, list[Part]]:
    """What the inputs are (recorded in embeddings.json) and the parts to write."""
    if len(inputs) == 1 and is_dataset(inputs[0]):
        dataset = inputs[0]
        index = read_index(dataset)
        parts = [Part(Path(s.name).stem, s.samples, shard=f"shards/{s.name}") for s in index.shards]
        where = dataset if storage.is_url(dataset) else str(Path(dataset).resolve())
        return {"kind": "shards", "dataset": where, "samples": index.samples}, parts
    for item in inputs:
        if storage.is_url(item) or is_dataset(item):
            raise ConfigError(f"{item}: give one dataset folder (of `medssl ingest`) alone, or local image files and "
                              "folders")
    files = list_image_files([Path(i) for i in inputs])
    if not files:
        raise ConfigError("no image files under the inputs")
    parts = [Part(f"files-{i // FILES_PER_PART:06d}", len(chunk), files=chunk)
             for i in range(0, len(files), FILES_PER_PART) for chunk in [files[i:i + FILES_PER_PART]]]
    inputs_shown = [str(Path(i).resolve()) for i in inputs]
    return {"kind": "files", "inputs": inputs_shown, "files": len(files)}, parts


def embed(inputs: list, run: str | Path, out: Path, batch_size: int = 64,
          ct_window: tuple[float, float] = DEFAULT_CT_WINDOW, device: str = "auto",
          show_progress: bool = True) -> EmbedSummary:
    """Embed every sample of ``inputs`` (one dataset folder, or image files / folders) into ``out``."""
    out = Path(out)
    source, parts = plan_parts(inputs)
    encoder = Encoder(run, ct_window, device, batch_size)
    run_shown = run if storage.is_url(run) else str(Path(run).resolve())
    manifest = {"format": FORMAT, "run": run_shown, "encoder": encoder.card, "ct_window": list(encoder.ct_window),
                "source": source, "parts": len(parts)}
    _check_or_write_manifest(out, manifest)
    summary = EmbedSummary(out)
    with tqdm(total=sum(p.samples for p in parts), desc="embed", unit="img", disable=not show_progress) as bar:
        for part in parts:
            path = out / PARTS / f"{part.name}.parquet"
            if path.exists():  # written atomically: present means complete
                summary.parts_skipped += 1
                summary.rejected += _rejected_of(path)
                bar.update(part.samples)
                continue
            rejected: list[dict] = []
            rows = (_shard_rows(source["dataset"], part, encoder) if part.shard else
                    _file_rows(part, encoder, rejected))
            summary.rows += _write_part(path, rows, encoder, rejected, bar)
            summary.rejected += rejected
            summary.parts_written += 1
    return summary


def _check_or_write_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in manifest if old.get(k) != manifest[k]]
        if changed:
            raise ConfigError(f"{out} holds embeddings of other inputs or another encoder ({', '.join(changed)} "
                              "differ): choose a new --out, or delete the folder to start again")
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no {MANIFEST}: choose a new or empty --out folder")
    atomic_write_text(path, json.dumps(manifest, indent=1))


def _member_offsets(shard: str | Path) -> dict[str, int]:
    """Sample key -> byte offset of its first tar member, from the headers alone (data blocks are skipped)."""
    offsets: dict[str, int] = {}
    with storage.open_read(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            key = member.name.rpartition("/")[2].partition(".")[0]
            offsets.setdefault(key, member.offset)
    return offsets


def _source_paths(dataset: str, shard_name: str) -> dict[str, str]:
    """Sample key -> its source file as the dataset's manifest names it (a path relative to its input, or
    with ``redact_paths`` the dataset's salted reference), from the one manifest part of the shard's unit."""
    match = re.match(r"shard-(\d{6})-", shard_name)
    part = storage.join(dataset, "manifest", f"chunk-{match.group(1)}.jsonl") if match else None
    if part is None or not storage.exists(part):
        return {}
    rows = [json.loads(line) for line in storage.read_text(part).splitlines() if line]
    return {key: r["path"] for r in rows for key in r.get("samples", [])}


def _shard_rows(dataset: str, part: Part, encoder: Encoder) -> Iterator[tuple[dict, np.ndarray, bool]]:
    shard = storage.join(dataset, *part.shard.split("/"))
    offsets = _member_offsets(shard)
    sources = _source_paths(dataset, part.shard.rpartition("/")[2])
    for sample in read_shard(shard):
        meta = sample.meta
        values = fit_square(decode_pixels(sample.pixels, meta), encoder.input_size)
        row = {"key": sample.key, "source_sha256": meta["source"]["sha256"], "modality": meta.get("modality", ""),
               "frame": int(meta["source"].get("frame", 0)), "shard": part.shard, "offset": offsets[sample.key],
               "path": sources.get(sample.key)}
        yield row, values, meta["intensity"]["semantics"] == "hounsfield"


def _file_rows(part: Part, encoder: Encoder, rejected: list[dict]) -> Iterator[tuple[dict, np.ndarray, bool]]:
    settings, budget = encoder.decode_settings(), encoder.decode_budget()
    for path in part.files:
        try:
            d = decode_file(path, settings, budget)
        except Rejected as r:
            rejected.append({"path": str(path), "reason": f"{r.code}: {r.detail}"})
            continue
        row = {"key": d.key, "source_sha256": d.sha256, "modality": d.modality, "frame": d.frame, "shard": None,
               "offset": None, "path": str(path.resolve())}
        yield row, d.values, d.is_ct


def _write_part(path: Path, rows: Iterable[tuple[dict, np.ndarray, bool]], encoder: Encoder,
                rejected: list[dict], bar: tqdm) -> int:
    """Encode the rows in batches and write them as one Parquet file; returns the number of rows."""
    records, features, batch = [], [], []
    for item in rows:
        batch.append(item)
        if len(batch) == encoder.batch_size:
            _encode(batch, encoder, records, features, bar)
            batch = []
    _encode(batch, encoder, records, features, bar)
    bar.update(len(rejected))
    dim = encoder.card["feature_dim"]
    flat = np.concatenate(features).reshape(-1) if features else np.zeros(0, np.float32)
    table = pa.table({
        "key": pa.array([r["key"] for r in records], pa.string()),
        "source_sha256": pa.array([r["source_sha256"] for r in records], pa.string()),
        "modality": pa.array([r["modality"] for r in records], pa.string()),
        "frame": pa.array([r["frame"] for r in records], pa.int32()),
        "shard": pa.array([r["shard"] for r in records], pa.string()),
        "offset": pa.array([r["offset"] for r in records], pa.int64()),
        "path": pa.array([r["path"] for r in records], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
    }).replace_schema_metadata({"medssl.rejected": json.dumps(rejected)})
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f)
    return len(records)


def _encode(batch: list, encoder: Encoder, records: list, features: list, bar: tqdm) -> None:
    if not batch:
        return
    images = np.stack([values for _, values, _ in batch]).astype(np.float32)
    is_ct = np.array([ct for _, _, ct in batch], dtype=bool)
    features.append(encoder.features(images, is_ct))
    records += [row for row, _, _ in batch]
    bar.update(len(batch))


def _rejected_of(path: Path) -> list[dict]:
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(b"medssl.rejected", b"[]"))


def read_embeddings(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """All parts of an embeddings folder as one table, in part order."""
    parts = sorted((Path(folder) / PARTS).glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder} has no {PARTS}/*.parquet: is it an output of `medssl embed`?")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as an (N, D) float32 array."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
