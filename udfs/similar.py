"""Table macros ``similar(vector, k[, embedding[, allowed]])`` and ``similar_to(targetid, k[, embedding[, allowed]])``.

Both return ``(TargetID BIGINT, distance FLOAT)``, nearest first, where
``distance`` is the cosine distance (1 - cosine similarity). ``embedding`` is
``'astro'`` (default, ``emb_astro``) or ``'shen'`` (``emb_shen``).
``similar_to`` leaves the target itself out.

Filtered search: ``allowed`` is a list of the TargetIDs a neighbour may be,
typically a subquery, and the result then holds ``k`` rows from that set
(fewer only when the set is smaller; none when it is empty)::

    SELECT * FROM similar_to(39627640566170902, 20, 'astro',
        (SELECT coalesce(list(TargetID), []) FROM ard WHERE Z < 0.2 AND Web_Class = 'Void'));

``coalesce`` matters: ``list()`` over no row is NULL, and a NULL ``allowed`` means no filter.

Two implementations with one signature:

* persistent, pure SQL (``sql/macros/similar.sql``, ``sql/macros/similar_to.sql``, in
  ``ard.duckdb``): brute force ``array_cosine_distance`` over the ``embed``
  view; works in the DuckDB shell and BI tools;
* this module's TEMP macros (``sql/similar_index/*.sql``), created on every
  connection of ``ard_sql.open()`` when the build wrote the HNSW indexes:
  they shadow the persistent ones and ask the memory-mapped USearch index
  through the arrow scalar UDFs ``ard_similar`` / ``ard_similar_to``, which
  return ``LIST(STRUCT(TargetID, distance))`` for the macro to ``unnest``.
  A filtered query first asks the index for ``k x oversampling`` neighbours
  and keeps those in ``allowed``, doubling until ``k`` survive; a small or
  very selective set is searched exactly (its vectors read from the index).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ard_sql import paths
from ard_sql import sql as packaged_sql
from ard_sql.similarity import EMBEDDINGS, Neighbours, embedding_column, open_index, search, usable_query
from ard_sql.udfs import create_function

if TYPE_CHECKING:  # pragma: no cover
    from ard_sql.connection import ARD

#: SQL functions this module registers: name -> (signature, one line for ``ard_functions``);
#: the TEMP macros of ``MACRO_FILES`` are described by their files' first comment lines.
SQL_FUNCTIONS: dict[str, tuple[str, str]] = {
    "ard_similar": ("ard_similar(vector FLOAT[], k BIGINT, embedding VARCHAR, allowed BIGINT[])",
                    "the HNSW-index search behind the index-backed \"similar\": LIST(STRUCT(TargetID, distance))"),
    "ard_similar_to": ("ard_similar_to(targetid BIGINT, k BIGINT, embedding VARCHAR, allowed BIGINT[])",
                       "the HNSW-index search behind the index-backed similar_to"),
}

RESULT_TYPE = "STRUCT(TargetID BIGINT, distance FLOAT)[]"
_ARROW_RESULT = pa.list_(pa.struct([("TargetID", pa.int64()), ("distance", pa.float32())]))
#: An ``allowed`` set at most this large (or this fraction of the index) is searched exactly.
EXACT_MAX = 50_000
EXACT_FRACTION = 0.02
MACRO_FILES = ("similar_index/similar.sql", "similar_index/similar_to.sql")


class IndexSet:
    """The memory-mapped indexes of one ARD folder, opened lazily and shared by its cursors."""

    def __init__(self, ard_dir: Path) -> None:
        self.ard_dir = Path(ard_dir)
        self._indexes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Unmap the indexes (the last ARD open on the folder closes; see ``ard_sql.connection``)."""
        with self._lock:
            for index in self._indexes.values():
                index.reset()
            self._indexes.clear()

    def available(self) -> bool:
        """True when every embedding's index file exists."""
        return all(paths.index_file(self.ard_dir, col).exists() for col in EMBEDDINGS.values())

    def get(self, embedding: str):
        """The index of ``embedding`` ('astro', 'shen' or the column name); clear error if missing."""
        col = embedding_column(embedding)
        with self._lock:
            if col not in self._indexes:
                path = paths.index_file(self.ard_dir, col)
                index = open_index(path)
                if index is None:
                    raise FileNotFoundError(f"no HNSW index for {col} at {path}; run `ard build ... --layers embed`")
                self._indexes[col] = index
            return self._indexes[col]


def exact_search(index, vector: np.ndarray, keys: np.ndarray, k: int) -> Neighbours:
    """Exact cosine k-NN of ``vector`` among ``keys`` (vectors read back from the index, f16)."""
    keys = np.asarray(keys, dtype=np.uint64)
    keys = keys[index.contains(keys)] if len(keys) else keys
    if len(keys) == 0 or k <= 0:
        return Neighbours(np.empty(0, np.int64), np.empty(0, np.float32))
    vecs = np.stack(index.get(keys)).astype(np.float32)
    q = np.asarray(vector, np.float32)
    sims = vecs @ q / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(q) + 1e-30)
    dist = (1.0 - sims).astype(np.float32)
    order = np.lexsort((keys, dist))[:k]
    return Neighbours(keys[order].astype(np.int64), dist[order])


def filtered_search(index, vector: np.ndarray, k: int, allowed: np.ndarray, oversampling: int = 4) -> Neighbours:
    """``k`` nearest neighbours restricted to ``allowed`` keys (oversample + refill, exact when selective)."""
    allowed = np.unique(np.asarray(allowed, dtype=np.int64))
    n = len(index)
    if len(allowed) <= max(4 * k, min(EXACT_MAX, int(EXACT_FRACTION * n))):
        return exact_search(index, vector, allowed, k)
    # expected hits among the first m neighbours: m * |allowed| / n; ask for several times k
    m = int(min(n, max(k, k * oversampling * n / len(allowed))))
    while True:
        res = search(index, vector, m)
        keep = np.isin(res.targetid, allowed)
        if keep.sum() >= k or m >= n:
            break
        m = min(n, 2 * m)
    if keep.sum() >= min(k, len(allowed)):
        return Neighbours(res.targetid[keep][:k], res.distance[keep][:k])
    # the graph search missed some allowed points: answer exactly rather than short
    return exact_search(index, vector, allowed, k)


def _as_lists(results: list[Neighbours | None]) -> pa.Array:
    out = [None if r is None else [{"TargetID": int(t), "distance": float(d)} for t, d in zip(r.targetid, r.distance)]
           for r in results]
    return pa.array(out, type=_ARROW_RESULT)


def _neighbours(index, vector: np.ndarray, k: int, allowed: Any, exclude: int | None) -> Neighbours:
    # the brute-force macros refuse it too; a NULL k, a NULL vector or a target without an embedding never
    # reaches here (no rows, whatever k, on both paths)
    if k < 0:
        raise ValueError(f"similar: k must be >= 0, got {k}")
    extra = 1 if exclude is not None else 0
    if not usable_query(vector, index.ndim):  # NaN or all-zero: no distance is defined, on either path
        return Neighbours(np.empty(0, np.int64), np.empty(0, np.float32))
    if allowed is None:
        res = search(index, vector, k + extra)
    else:
        # a NULL inside the list names no target
        res = filtered_search(index, vector, k + extra, np.asarray([a for a in allowed if a is not None], dtype=np.int64))
    if exclude is not None:
        keep = res.targetid != exclude
        res = Neighbours(res.targetid[keep][:k], res.distance[keep][:k])
    return Neighbours(res.targetid[:k], res.distance[:k])


def _make_udfs(indexes: IndexSet):
    def ard_similar(vector: pa.Array, k: pa.Array, embedding: pa.Array, allowed: pa.Array) -> pa.Array:
        out: list[Neighbours | None] = []
        for v, kk, emb, al in zip(vector.to_pylist(), k.to_pylist(), embedding.to_pylist(), allowed.to_pylist()):
            if v is None or kk is None:
                out.append(None)
                continue
            index = indexes.get(emb or "astro")
            out.append(_neighbours(index, np.asarray(v, np.float32), int(kk), al, None))
        return _as_lists(out)

    def ard_similar_to(targetid: pa.Array, k: pa.Array, embedding: pa.Array, allowed: pa.Array) -> pa.Array:
        out: list[Neighbours | None] = []
        for t, kk, emb, al in zip(targetid.to_pylist(), k.to_pylist(), embedding.to_pylist(), allowed.to_pylist()):
            if t is None or kk is None:
                out.append(None)
                continue
            index = indexes.get(emb or "astro")
            vec = index.get(np.uint64(t)) if t >= 0 and index.contains(np.uint64(t)) else None
            # a target without an embedding (NULL, or not in the index) has no neighbours
            out.append(None if vec is None else _neighbours(index, np.asarray(vec, np.float32), int(kk), al, int(t)))
        return _as_lists(out)

    return ard_similar, ard_similar_to


def register(con, ard: "ARD") -> None:
    """Create the UDFs (once per database) and, when the indexes exist, the TEMP macros shadowing the SQL ones."""
    indexes = ard.cache.get("similar")
    if indexes is None:
        indexes = ard.cache["similar"] = IndexSet(ard.path)
    ard_similar, ard_similar_to = _make_udfs(indexes)
    common = dict(type="arrow", null_handling="special", side_effects=False)
    create_function(con, ard, "ard_similar", ard_similar, ["FLOAT[]", "BIGINT", "VARCHAR", "BIGINT[]"], RESULT_TYPE, **common)
    create_function(con, ard, "ard_similar_to", ard_similar_to, ["BIGINT", "BIGINT", "VARCHAR", "BIGINT[]"], RESULT_TYPE, **common)
    if not indexes.available():
        return  # no index yet: the persistent brute-force macros answer
    for rel in MACRO_FILES:
        con.execute(packaged_sql.text(rel))
