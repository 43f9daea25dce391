"""Benchmark: USearch HNSW (cosine, f16) vs DuckDB brute-force array_cosine_distance.

Synthetic clustered unit vectors (a mixture of Gaussian clusters, like the
spectral embeddings: galaxies crowd into types), N x D. One process, same data:

* index build time and file size (``ard_sql.similarity.build_index``, the build's code path);
* recall@10 of the memory-mapped index against exact search (numpy, float32);
* per-query latency of the index (``ard_sql.similarity.search``) vs DuckDB
  ``ORDER BY array_cosine_distance(v, q) LIMIT 10`` over a FLOAT[D] table, and the ratio.

Usage::

    nice -n 10 python3 bench/bench_similar.py --n 200000 --dim 768 --queries 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def clustered_vectors(n: int, dim: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors drawn around ``n_clusters`` random centres (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    step = 100_000
    for i in range(0, n, step):
        m = min(step, n - i)
        lab = rng.integers(0, n_clusters, m)
        out[i:i + m] = centres[lab] + spread * rng.standard_normal((m, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k (vectors are unit-norm) by blocked matrix products."""
    sims = queries @ vectors.T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1)
    return np.take_along_axis(top, order, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.35, help="per-axis cluster noise relative to the unit centre scale")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--duckdb-queries", type=int, default=5)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import duckdb
    import pyarrow as pa

    from ard_sql.similarity import build_index, open_index, search

    t0 = time.perf_counter()
    vec = clustered_vectors(args.n, args.dim, args.clusters, args.spread, args.seed)
    keys = np.arange(args.n, dtype=np.int64) + 39_627_000_000_000_000
    rng = np.random.default_rng(args.seed + 1)
    # queries: perturbed members of the collection (a "find galaxies like this one" query)
    qi = rng.choice(args.n, args.queries, replace=False)
    q = vec[qi] + 0.05 * rng.standard_normal((args.queries, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    print(f"data: {args.n} x {args.dim}, {args.clusters} clusters, made in {time.perf_counter() - t0:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb.usearch"
        rep = build_index(keys, vec, path, threads=args.threads)
        print(f"index build: {rep['seconds']:.1f} s, file {rep['bytes'] / 2**20:.1f} MiB ({rep['n']} vectors, f16, cosine)")
        index = open_index(path)

        truth = keys[exact_top(vec, q, args.k)]
        t1 = time.perf_counter()
        got = [search(index, qq, args.k).targetid for qq in q]
        t_idx = (time.perf_counter() - t1) / len(q)
        recall = np.mean([len(set(g) & set(t)) / args.k for g, t in zip(got, truth)])
        print(f"HNSW: recall@{args.k} = {recall:.4f}, {t_idx * 1e3:.2f} ms/query (memory-mapped view)")

        con = duckdb.connect()
        con.execute(f"SET threads = {max(args.threads, 0) or 2}")
        tbl = pa.table({"TargetID": keys, "v": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), args.dim)})
        con.register("tbl_arrow", tbl)
        con.execute(f"CREATE TABLE e AS SELECT TargetID, v::FLOAT[{args.dim}] AS v FROM tbl_arrow")
        con.unregister("tbl_arrow")
        del tbl
        sql = (f"SELECT TargetID FROM e ORDER BY array_cosine_distance(v, ?::FLOAT[{args.dim}]) LIMIT {args.k}")
        nq = min(args.duckdb_queries, len(q))
        t2 = time.perf_counter()
        duck = [con.execute(sql, [q[i].tolist()]).fetchnumpy()["TargetID"] for i in range(nq)]
        t_duck = (time.perf_counter() - t2) / nq
        drec = np.mean([len(set(d) & set(t)) / args.k for d, t in zip(duck, truth[:nq])])
        print(f"DuckDB brute force: {t_duck * 1e3:.1f} ms/query (recall {drec:.3f})")
        print(f"speed ratio (DuckDB / HNSW): {t_duck / t_idx:.1f}x")


if __name__ == "__main__":
    main()
