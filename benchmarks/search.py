#!/usr/bin/env python
"""Similar-case search: which nearest-neighbour library, by speed and recall on our encoder's embeddings.

Candidates: usearch, faiss-cpu (IndexHNSWFlat) and hnswlib, all HNSW graphs with the same parameters
(M / connectivity 16, construction breadth 128), cosine similarity (vectors L2-normalised, inner
product), one thread each (the machine is shared; single-thread numbers also compare libraries fairly),
and exact search (numpy matrix product) as the reference. The libraries count the search breadth
(ef_search) differently, so each graph is queried at several breadths (``--ef``): compare them at equal
recall, not at equal nominal settings.

Data: the real embeddings of an ``medssl embed`` output (``--embeddings``). An archive smaller than ``--n``
is filled up to ``--n`` rows with synthetic rows made from the real ones (``--fill``):

- ``mix`` (default): normalise(x_a + u (x_b - x_a) + s e): a real vector moved a uniform share u of the
  way towards one of its 10 nearest real neighbours x_b, plus a little noise (s = sigma / 2, e ~ N(0, I)):
  new points along the archive's own manifold, as new images of the same kinds would fall;
- ``noise``: copies normalise(x + sigma e) of each real vector in turn: clumps of near-duplicates around
  every real image (an archive full of near-identical adjacent slices; hard for graph indexes).

sigma is chosen so that a noise copy lies as far from its origin as the median real nearest neighbour
(cosine distance). Queries: ``--queries`` fresh synthetic rows of the same kind (not in the index), one
at a time (batch 1). Ground truth: exact search over the same rows.

Measured per library: build time (adding all rows), and per search breadth query latency p50 / p99
(batch 1, ``--queries`` queries) and recall@10 = |approximate top 10 ∩ exact top 10| / 10, averaged.

    medssl embed bench-out/paper/shards --run bench-out/paper/pretrain --out /tmp/emb-paper
    python benchmarks/search.py --embeddings /tmp/emb-paper --n 100000 --json /tmp/search.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: its BLAS (the exact search) reads it at import
import numpy as np  # noqa: E402

from medssl.machine import machine_facts, version
from medssl.retrieval.embed import embedding_matrix, read_embeddings  # noqa: E402

M, EF_CONSTRUCTION, K = 16, 128, 10
EF_SEARCH = (64, 128, 256, 512)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def median_nn_distance(real: np.ndarray) -> float:
    """Median cosine distance from a real vector to its nearest other real vector."""
    sims = real @ real.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.median(1.0 - sims.max(axis=1)))


def noise_scale(real: np.ndarray, target: float, rng: np.random.Generator) -> float:
    """sigma such that the median cosine distance between x and normalise(x + sigma * e) is ``target``."""
    lo, hi = 0.0, 1.0
    probe = real[rng.choice(len(real), min(500, len(real)), replace=False)]
    noise = rng.standard_normal(probe.shape).astype(np.float32)
    for _ in range(40):  # bisection: the distance grows with sigma
        mid = (lo + hi) / 2
        d = np.median(1.0 - np.sum(probe * normalise(probe + mid * noise), axis=1))
        lo, hi = (mid, hi) if d < target else (lo, mid)
    return (lo + hi) / 2


def filled(real: np.ndarray, n: int, fill: str, sigma: float, neighbours: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    """``n`` synthetic rows made from the real ones (see the module's docstring)."""
    dim = real.shape[1]
    if fill == "noise":
        origins = np.arange(n) % len(real)
        return normalise(real[origins] + sigma * rng.standard_normal((n, dim), dtype=np.float32))
    a = rng.integers(0, len(real), n)
    b = neighbours[a, rng.integers(0, neighbours.shape[1], n)]
    u = rng.random((n, 1), dtype=np.float32)
    return normalise(real[a] + u * (real[b] - real[a]) + sigma / 2 * rng.standard_normal((n, dim), dtype=np.float32))


def nearest_real(real: np.ndarray, k: int = 10) -> np.ndarray:
    """(N, k) indices of each real vector's k nearest other real vectors."""
    sims = real @ real.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k, axis=1)[:, :k]


def exact_top(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    top = np.empty((len(queries), K), dtype=np.int64)
    for i in range(0, len(queries), 256):
        sims = queries[i:i + 256] @ data.T
        part = np.argpartition(-sims, K, axis=1)[:, :K]
        order = np.take_along_axis(sims, part, 1).argsort(axis=1)[:, ::-1]
        top[i:i + 256] = np.take_along_axis(part, order, 1)
    return top


class Exact:
    name = "exact (numpy)"

    def build(self, data):
        self.data = data

    def set_ef(self, ef):
        pass  # exact: no breadth

    def query(self, q):
        sims = self.data @ q
        part = np.argpartition(-sims, K)[:K]
        return part[np.argsort(-sims[part])]


class Usearch:
    name = "usearch"

    def build(self, data):
        from usearch.index import Index

        self.index = Index(ndim=data.shape[1], metric="ip", dtype="f32", connectivity=M,
                           expansion_add=EF_CONSTRUCTION)
        self.index.add(np.arange(len(data)), data, threads=1)

    def set_ef(self, ef):
        self.index.expansion_search = ef

    def query(self, q):
        return self.index.search(q, K, threads=1).keys


class Faiss:
    name = "faiss-cpu (HNSWFlat)"

    def build(self, data):
        import faiss

        faiss.omp_set_num_threads(1)
        self.index = faiss.IndexHNSWFlat(data.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = EF_CONSTRUCTION
        self.index.add(data)

    def set_ef(self, ef):
        self.index.hnsw.efSearch = ef

    def query(self, q):
        return self.index.search(q[None], K)[1][0]


class Hnswlib:
    name = "hnswlib"

    def build(self, data):
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=data.shape[1])
        self.index.init_index(max_elements=len(data), M=M, ef_construction=EF_CONSTRUCTION)
        self.index.set_num_threads(1)
        self.index.add_items(data, np.arange(len(data)))

    def set_ef(self, ef):
        self.index.set_ef(ef)

    def query(self, q):
        return self.index.knn_query(q, k=K)[0][0]


CANDIDATES = {"exact": Exact, "usearch": Usearch, "faiss": Faiss, "hnswlib": Hnswlib}
DISTRIBUTIONS = {"usearch": "usearch", "faiss": "faiss-cpu", "hnswlib": "hnswlib", "exact": "numpy"}


def query_all(candidate, queries: np.ndarray, truth: np.ndarray) -> dict:
    latencies, hits = [], 0
    for q, expected in zip(queries, truth):
        t = time.perf_counter_ns()
        found = candidate.query(q)
        latencies.append((time.perf_counter_ns() - t) / 1e6)
        hits += len(set(np.asarray(found).tolist()) & set(expected.tolist()))
    return {"p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "recall_at_10": round(hits / (K * len(queries)), 4)}


def measure(candidate, data: np.ndarray, queries: np.ndarray, truth: np.ndarray, breadths: list[int]) -> dict:
    """Build once, then query at each search breadth: {"build_s", "searches": [{"ef", p50, p99, recall}]}."""
    start = time.perf_counter()
    candidate.build(data)
    build_s = time.perf_counter() - start
    searches = []
    for ef in breadths:
        candidate.set_ef(ef)
        searches.append({"ef": ef, **query_all(candidate, queries, truth)})
    return {"build_s": round(build_s, 2), "searches": searches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", type=Path, required=True, help="an output folder of `medssl embed`")
    parser.add_argument("--n", type=int, default=100_000, help="rows in the index (default 100,000)")
    parser.add_argument("--fill", choices=["mix", "noise"], default="mix",
                        help="how rows beyond the real ones are made (default mix; see the docstring)")
    parser.add_argument("--queries", type=int, default=1000, help="queries, one at a time (default 1,000)")
    parser.add_argument("--ef", default=",".join(map(str, EF_SEARCH)),
                        help="search breadths, comma-separated (default %(default)s)")
    parser.add_argument("--only", action="append", choices=sorted(CANDIDATES), help="run only these (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    breadths = [int(v) for v in args.ef.split(",")]

    rng = np.random.default_rng(args.seed)
    real = normalise(embedding_matrix(read_embeddings(args.embeddings, ["embedding"])))
    target = median_nn_distance(real)
    sigma = noise_scale(real, target, rng)
    neighbours = nearest_real(real)
    data = np.concatenate([real, filled(real, max(0, args.n - len(real)), args.fill, sigma, neighbours, rng)])[:args.n]
    queries = filled(real, args.queries, args.fill, sigma, neighbours, rng)
    truth = exact_top(data, queries)

    info = {**machine_facts(), **{f"{d}_version": version(d) for d in DISTRIBUTIONS.values()}}
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, load {info['load_average_at_start']}")
    print(f"data: {len(real)} real embeddings (dim {real.shape[1]}) of {args.embeddings}, filled to {len(data)} rows "
          f"({args.fill}); median real 1-NN cosine distance {target:.4f}, copy noise sigma {sigma:.4f}; "
          f"{args.queries} queries")
    results = {}
    print(f"{'library':<22} {'version':>10} {'build s':>8} {'ef':>5} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>10}")
    for name in args.only or list(CANDIDATES):
        try:
            r = measure(CANDIDATES[name](), data, queries, truth, [0] if name == "exact" else breadths)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        results[name] = {**r, "version": version(DISTRIBUTIONS[name])}
        for q in r["searches"]:
            print(f"{CANDIDATES[name].name:<22} {results[name]['version']:>10} {r['build_s']:>8.2f} "
                  f"{q['ef'] or '-':>5} "
                  f"{q['p50_ms']:>8.3f} {q['p99_ms']:>8.3f} {q['recall_at_10']:>10.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "machine": info, "rows": len(data), "real": len(real),
            "fill": args.fill,
            "dim": int(real.shape[1]), "queries": args.queries, "median_nn_distance": target, "sigma": sigma,
            "params": {"M": M, "ef_construction": EF_CONSTRUCTION, "ef_search": breadths, "threads": 1},
            "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
