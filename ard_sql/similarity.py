"""Vector similarity over the ARD's embeddings: HNSW index files and ``find_similar``.

One USearch HNSW index per embedding column (cosine metric, vectors stored as
f16) lives at ``paths.index_file(ard_dir, "emb_astro")``; its keys are the
TargetIDs. The build writes it (``build_index``); a session memory-maps it
(``open_index``, ``Index.restore(path, view=True)``) so opening is instant and
the pages are shared between processes.

``find_similar`` is the Python face of the SQL table macros
``similar(vector, k[, embedding])`` and ``similar_to(targetid, k[, embedding])``
(``udfs/similar.py``): it returns the neighbours joined with the ``ard`` view.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Embedding short names (the SQL macros' optional third argument) -> column.
EMBEDDINGS: dict[str, str] = {"astro": "emb_astro", "shen": "emb_shen"}

#: HNSW graph parameters. Connectivity 32 and wide expansion keep recall@10
#: above 0.95 on clustered 768-d data (bench/bench_similar.py); the search
#: expansion is raised further per query when k is large (see ``search``).
CONNECTIVITY = 32
EXPANSION_ADD = 128
EXPANSION_SEARCH = 256

#: Held around setting ``expansion_search`` and searching: the index objects are shared by
#: every cursor (``udfs/similar.py``) and USearch takes the expansion from the index, not
#: from ``Index.search``, so a concurrent query must not change it mid-search.
_SEARCH_LOCK = threading.Lock()


def embedding_column(embedding: str) -> str:
    """Map ``'astro'``/``'shen'`` (or the column name itself) to the column name."""
    key = embedding.lower().removeprefix("emb_")
    if key not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {embedding!r}; known: {', '.join(EMBEDDINGS)}")
    return EMBEDDINGS[key]


def build_index(keys: np.ndarray, vectors: np.ndarray, path: Path | str, *, threads: int = 0) -> dict[str, Any]:
    """Build a cosine HNSW index (f16 storage) over ``vectors`` keyed by ``keys`` and save it atomically.

    Rows whose vector is NULL (NaN) or all zero are skipped: a cosine distance
    to them is undefined. Returns a small report (n, ndim, seconds, bytes).
    """
    import time

    from usearch.index import Index

    from ard_sql.paths import temporary_sibling

    keys = np.asarray(keys, dtype=np.uint64)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(keys) != len(vectors):
        raise ValueError(f"build_index: keys {keys.shape} and vectors {vectors.shape} do not match")
    ok = np.isfinite(vectors).all(axis=1) & (np.abs(vectors).sum(axis=1) > 0)
    index = Index(
        ndim=vectors.shape[1], metric="cos", dtype="f16",
        connectivity=CONNECTIVITY, expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH,
    )
    t0 = time.perf_counter()
    if ok.any():
        index.add(keys[ok], vectors[ok], threads=threads)
    seconds = time.perf_counter() - t0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    index.save(str(tmp))
    os.replace(tmp, path)
    return {"n": int(ok.sum()), "skipped": int((~ok).sum()), "ndim": int(vectors.shape[1]),
            "seconds": seconds, "bytes": path.stat().st_size}


def open_index(path: Path | str):
    """Memory-map a saved index (read-only view); ``None`` when the file does not exist."""
    from usearch.index import Index

    path = Path(path)
    if not path.exists():
        return None
    index = Index.restore(str(path), view=True)
    if index is None:
        raise ValueError(f"{path}: not a USearch index file")
    index.expansion_search = EXPANSION_SEARCH
    return index


@dataclass
class Neighbours:
    """Result of one k-NN query: TargetIDs and cosine distances, nearest first."""

    targetid: np.ndarray
    distance: np.ndarray


def search(index, vector: np.ndarray, k: int) -> Neighbours:
    """Return the ``k`` nearest keys of ``vector`` in ``index`` (cosine distance, nearest first)."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if not usable_query(vector, index.ndim) or k <= 0 or len(index) == 0:
        return Neighbours(np.empty(0, np.int64), np.empty(0, np.float32))
    k = min(int(k), len(index))
    # HNSW recall drops when k approaches the search beam; widen it for large k.
    with _SEARCH_LOCK:
        index.expansion_search = max(EXPANSION_SEARCH, 2 * k)
        m = index.search(vector, k)
    if len(m.keys) < k:
        # the graph reaches not every node: when k asks for (nearly) all of them, answer exactly, not short
        m = index.search(vector, k, exact=True)
    return Neighbours(np.asarray(m.keys, dtype=np.int64), np.asarray(m.distances, dtype=np.float32))


def usable_query(vector: np.ndarray, ndim: int) -> bool:
    """Whether ``vector`` can be a cosine query of an ``ndim`` index: False for NaN/inf or all-zero vectors
    (their distances are undefined: no neighbours); a wrong length raises ``ValueError``."""
    if vector.shape[0] != ndim:
        raise ValueError(f"query vector has {vector.shape[0]} dimensions; the index has {ndim}")
    return bool(np.isfinite(vector).all() and np.any(vector))


def find_similar(db: Any, targetid: int | None = None, vector: Any = None, k: int = 50,
                 embedding: str = "astro", where: str | None = None) -> "Any":
    """Return the ``k`` nearest neighbours as a pandas DataFrame joined with the ``ard`` view.

    Give either ``targetid`` (the target itself is excluded from its neighbours)
    or ``vector``. ``where`` is an optional SQL predicate on ``ard`` columns
    (e.g. ``"Z < 0.2 AND Web_Class = 'Void'"``); the result then holds ``k``
    rows that satisfy it (the filtered form of ``similar``, see
    docs/tutorial.md). ``db`` is the ARD connection object (or a DuckDB
    connection prepared by ``ard_sql.open``). Columns: ``distance`` then every
    ``ard`` column, nearest first.
    """
    if (targetid is None) == (vector is None):
        raise ValueError("find_similar: give exactly one of targetid= or vector=")
    from ard_sql.query import filter_to_sql

    con = getattr(db, "con", db)
    name = embedding_column(embedding).removeprefix("emb_")
    # The filtered form: the neighbours must come from the TargetIDs that satisfy `where`
    # (checked and translated like db.query's filters, so only known columns pass).
    # (coalesce: list() of no row is NULL, which the macros read as "no filter")
    allowed = f"(SELECT coalesce(list(TargetID), []::BIGINT[]) FROM ard WHERE {filter_to_sql(where)})" if where else "NULL"
    if targetid is not None:
        # SQL's similar_to answers an unknown target with no rows; a Python caller gets told why
        found = con.execute(f"SELECT emb_{name} IS NOT NULL FROM ard WHERE TargetID = ?", [int(targetid)]).fetchall()
        if not found:
            raise ValueError(f"find_similar: target {targetid} is not in the ARD")
        if not found[0][0]:
            raise ValueError(f"find_similar: target {targetid} has no emb_{name} (no usable spectrum; for emb_astro also "
                             "no usable Z, or a spectrum that reaches none of its head's rest-frame range)")
        src = f"similar_to(?, ?, '{name}', {allowed})"
        params: list[Any] = [int(targetid), int(k)]
    else:
        src = f"\"similar\"(?::FLOAT[], ?, '{name}', {allowed})"
        params = [np.asarray(vector, dtype=np.float32).reshape(-1).tolist(), int(k)]
    sql = (f"SELECT s.distance, a.* FROM {src} AS s JOIN ard AS a ON a.TargetID = s.TargetID "
           "ORDER BY s.distance, s.TargetID")
    return con.execute(sql, params).df()
