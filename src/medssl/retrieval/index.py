"""The nearest-neighbour index over an embeddings folder (``medssl search``, ``medssl serve``).

Similarity is cosine (the SSL objectives compare features by cosine): vectors are L2-normalised and
searched by inner product; the distance shown is 1 - cosine similarity (0 = same direction).

Library: faiss-cpu. On 100k embeddings of our encoder (benchmarks/search.py, BENCHMARKS.md "Similar-case
search") its HNSW graph had the highest recall@10 of usearch, faiss and hnswlib at every search breadth,
at about the same query latency, and it alone kept its recall on an archive of near-duplicate clumps.
An index of up to EXACT_BELOW rows is searched exactly (a flat index: ~1 ms a query there, recall 1).

Layout, inside the embeddings folder::

    index/vectors.faiss    the faiss index (row numbers are its ids)
    index/rows.parquet     the rows' columns without the embeddings (key, modality, thumbnail reference)
    index/index.json       written last: the parts it was built from, the library and its settings

An index whose parts differ from the folder's (``medssl embed`` added some) is rebuilt on opening.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medssl.atomic import atomic_open, atomic_write_text
from medssl.retrieval.embed import MANIFEST, PARTS, embedding_matrix

SAME = 1e-6  # features (and distances) that differ less than this are one image's


@dataclass
class Neighbour:
    row: int
    distance: float
    copies: list[int] = field(default_factory=list)  # rows with the same features (other files of one image)


INDEX_DIR = "index"
EXACT_BELOW = 20_000
# HNSW settings measured in benchmarks/search.py: recall@10 0.991 at ~0.12 ms a query on 100k rows.
HNSW_M, EF_CONSTRUCTION, EF_SEARCH = 16, 128, 128
ROW_COLUMNS = ["key", "source_sha256", "modality", "frame", "shard", "offset", "path"]


def _parts(folder: Path) -> dict[str, int]:
    """The folder's Parquet parts and their sizes: what an index was built from."""
    return {p.name: p.stat().st_size for p in sorted((folder / PARTS).glob("*.parquet"))}


def build_index(folder: Path, exact_below: int = EXACT_BELOW) -> Path:
    """Build ``folder/index/`` from every part of an embeddings folder, part by part."""
    import faiss

    folder = Path(folder)
    parts = _parts(folder)
    if not parts:
        raise FileNotFoundError(f"{folder} has no {PARTS}/*.parquet: run `medssl embed ... --out {folder}` first")
    count = sum(pq.read_metadata(folder / PARTS / name).num_rows for name in parts)
    dim = json.loads((folder / MANIFEST).read_text())["encoder"]["feature_dim"]
    if count < exact_below:
        graph, kind = faiss.IndexFlatIP(dim), "exact"
    else:
        graph, kind = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT), "hnsw"
        graph.hnsw.efConstruction = EF_CONSTRUCTION
    rows = []
    for name in parts:
        table = pq.read_table(folder / PARTS / name)
        graph.add(_normalised(embedding_matrix(table)))
        rows.append(table.select(ROW_COLUMNS))
    out = folder / INDEX_DIR
    out.mkdir(exist_ok=True)
    tmp = out / f"vectors.faiss.{os.getpid()}.tmp"
    faiss.write_index(graph, str(tmp))
    os.replace(tmp, out / "vectors.faiss")
    with atomic_open(out / "rows.parquet", "wb") as f:
        pq.write_table(pa.concat_tables(rows), f)
    settings = {"M": HNSW_M, "ef_construction": EF_CONSTRUCTION, "ef_search": EF_SEARCH} if kind == "hnsw" else {}
    atomic_write_text(out / "index.json", json.dumps({
        "library": f"faiss-cpu {metadata.version('faiss-cpu')}", "kind": kind, "metric": "cosine", "rows": count,
        "dim": dim, "settings": settings, "parts": parts}, indent=1))
    return out


def index_is_current(folder: Path) -> bool:
    record = Path(folder) / INDEX_DIR / "index.json"
    return record.exists() and json.loads(record.read_text())["parts"] == _parts(Path(folder))


class SearchIndex:
    """An opened index: rows by number, key lookup, and the ``k`` nearest rows of a vector."""

    def __init__(self, folder: Path):
        import faiss

        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.record = json.loads((self.folder / INDEX_DIR / "index.json").read_text())
        self.rows = pq.read_table(self.folder / INDEX_DIR / "rows.parquet")
        self._graph = faiss.read_index(str(self.folder / INDEX_DIR / "vectors.faiss"))
        if self.record["kind"] == "hnsw":
            self._graph.hnsw.efSearch = self.record["settings"]["ef_search"]
        self.count = self.rows.num_rows
        self.library = f"{self.record['library']} ({self.record['kind']})"

    def row(self, i: int) -> dict:
        return {name: self.rows.column(name)[i].as_py() for name in ROW_COLUMNS}

    def find_key(self, key: str) -> int | None:
        i = pc.index(self.rows.column("key"), key).as_py()
        return None if i < 0 else i

    def vector(self, i: int) -> np.ndarray:
        return self._graph.reconstruct(int(i))

    def search(self, vector: np.ndarray, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` nearest rows of ``vector`` (any scale), nearest first: (row, cosine distance)."""
        query = _normalised(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        similarities, ids = self._graph.search(query, min(k, self.count))
        return [(int(i), float(max(0.0, 1.0 - s))) for i, s in zip(ids[0], similarities[0]) if i >= 0]

    def same_image(self, a: int, b: int) -> bool:
        """Rows with the same features: one image stored in several files (or encodings)."""
        return float(np.abs(self.vector(a) - self.vector(b)).max()) <= SAME

    def neighbours(self, vector: np.ndarray, k: int = 10, query_row: int | None = None) -> list[Neighbour]:
        """The ``k`` nearest *images* of ``vector``, for people to read: the query's own row is left out,
        and rows with the same features (one image stored as several files, in several encodings) are one
        neighbour with its ``copies``. Copies of the query itself come first, at distance 0."""
        found: list[Neighbour] = []
        wanted, ask = k, k + 1
        while True:
            hits = self.search(vector, ask)
            found = []
            for row, distance in hits:
                if row == query_row:
                    continue
                same = next((n for n in found if abs(n.distance - distance) <= SAME and self.same_image(n.row, row)),
                            None)
                if same is not None:
                    same.copies.append(row)
                else:
                    found.append(Neighbour(row, distance))
            if len(found) >= wanted or len(hits) < ask or ask >= self.count:
                return found[:wanted]
            ask = min(self.count, ask * 2)  # copies took places: look further


def open_index(folder: Path, log=print) -> SearchIndex:
    """The index of an embeddings folder, built first if it is missing or older than the folder's parts."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: pass a folder written by `medssl embed`")
    if not index_is_current(folder):
        log(f"building the search index of {folder} ...")
        build_index(folder)
    return SearchIndex(folder)


def _normalised(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)
