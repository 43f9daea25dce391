"""A persistence-filtered filament skeleton on a grid, in the spirit of DisPerSE.

DisPerSE (Sousbie 2011) builds the discrete Morse-Smale complex of the
Delaunay density of the galaxies, pairs critical points by persistence,
cancels pairs below an ``N sigma`` threshold and returns the ascending arcs
from 2-saddles to maxima as the filaments. This module does the same on a
smoothed density grid:

1. **Gradient field.** Every cell points to the highest of its 26 neighbours
   (itself if none is higher): the discrete steepest-ascent flow.
   Cells that point to themselves are the **maxima**.
2. **Ascending manifolds.** Following the pointers (pointer jumping) assigns every
   cell to the maximum it flows to: the basin (3-D ascending manifold) of that maximum.
3. **Saddles.** For every pair of adjacent basins, the highest pass between them
   (the neighbouring cell pair maximising ``min(f_a, f_b)``) is the filament
   saddle: the 2-saddle of Morse theory, through which the two maxima connect.
4. **Persistence pairs.** Saddles in decreasing density drive a union-find of the
   maxima (the merge tree of the superlevel sets): a saddle that joins two
   components kills the lower one's highest maximum; the pair's persistence is
   ``f(max) - f(saddle)``, its significance that difference over the Poisson
   noise of the two values, ``sqrt(sigma_max^2 + sigma_saddle^2)``.
5. **Simplification.** Pairs below ``nsigma`` (default 3) are cancelled. Each
   surviving saddle sends two **arcs** up the gradient flow, one into each
   basin; an arc that reaches a cancelled maximum continues through that
   maximum's own (cancelled) saddle to the next maximum, as arcs concatenate
   when DisPerSE cancels a pair. The union of arcs is the skeleton, a set of
   straight segments between neighbouring cell centres.

What differs from DisPerSE:

- a regular grid of a Gaussian-smoothed density, not the Delaunay tessellation
  (DTFE) of the galaxies: the resolution is the grid cell, not adaptive;
- only maximum/2-saddle pairs (0-dimensional persistence of superlevel sets)
  are computed; saddles that close a loop (paired with 1-saddles in DisPerSE)
  are not kept, so the skeleton is a forest with no loops;
- the noise level is the analytic Poisson noise of the smoothed field
  (``sigma_f = sqrt(f / (n_bar V_eff))``), not DisPerSE's calibration on random sets;
- arcs are discrete steepest-ascent paths (26-connected staircases), not
  integral lines, and are not smoothed (DisPerSE's ``-smooth``).

Masked cells (``-inf`` or NaN in the field) are never maxima, saddles or part of an arc.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from scipy.spatial import cKDTree

#: The 26 neighbour offsets; the first 13 are the lexicographically positive half.
_OFFSETS: np.ndarray = np.array(
    sorted((o for o in product((-1, 0, 1), repeat=3) if o != (0, 0, 0)), key=lambda o: (o <= (0, 0, 0), o))
)
_HALF: np.ndarray = _OFFSETS[:13]
#: Points per block in :func:`distance_to_segments`.
_CHUNK = 1 << 18


@dataclass
class GridSkeleton:
    """Segments of a skeleton in grid-cell units (flat cell indices)."""

    start: np.ndarray
    """(m,) int64 flat index of each segment's first cell (lower on the flow)."""
    end: np.ndarray
    """(m,) int64 flat index of the next cell (towards the maximum)."""
    persistence: np.ndarray
    """(m,) float64 significance (in sigma) of the persistence pair that keeps the segment."""
    n_maxima: int
    """Number of maxima before simplification."""
    n_kept_saddles: int
    """Number of saddles whose pair survived the cut."""


def ascent_pointers(field: np.ndarray) -> np.ndarray:
    """Flat index of the highest of each cell's 26 neighbours (itself if none is higher).

    NaN or ``-inf`` cells are masked: they point to themselves and nothing points to them.
    """
    f = np.where(np.isfinite(field), field, -np.inf).astype(np.float32, copy=False)
    shape = f.shape
    pad = np.pad(f, 1, constant_values=-np.inf)
    best = f.copy()
    arg = np.full(shape, -1, dtype=np.int8)
    for c, (dx, dy, dz) in enumerate(_OFFSETS):
        view = pad[1 + dx : 1 + dx + shape[0], 1 + dy : 1 + dy + shape[1], 1 + dz : 1 + dz + shape[2]]
        better = view > best
        best = np.where(better, view, best)
        arg[better] = c
    del pad, best
    idx = np.arange(f.size, dtype=np.int64).reshape(shape)
    step = _OFFSETS[:, 0] * shape[1] * shape[2] + _OFFSETS[:, 1] * shape[2] + _OFFSETS[:, 2]
    ptr = np.where(arg >= 0, idx + np.append(step, 0)[arg], idx)
    return ptr.ravel()


def basin_labels(ptr: np.ndarray) -> np.ndarray:
    """Flat index of the maximum every cell flows to (pointer jumping)."""
    label = ptr.copy()
    while True:
        nxt = label[label]
        if np.array_equal(nxt, label):
            return label
        label = nxt


def basin_saddles(field: np.ndarray, label: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Highest pass between every pair of adjacent basins.

    Returns ``(max_a, max_b, value, cell_a, cell_b)``: the two maxima (flat
    indices), the saddle density ``min(f_a, f_b)`` and the two cells of the pass
    (``cell_a`` in the basin of ``max_a``).
    """
    shape = field.shape
    f = field.ravel()
    lab = np.where(valid.ravel(), label, -1).reshape(shape)
    idx = np.arange(f.size, dtype=np.int64).reshape(shape)
    parts = []
    for dx, dy, dz in _HALF:
        sa = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip((dx, dy, dz), shape))
        sb = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip((dx, dy, dz), shape))
        la, lb = lab[sa].ravel(), lab[sb].ravel()
        edge = (la != lb) & (la >= 0) & (lb >= 0)
        ca, cb = idx[sa].ravel()[edge], idx[sb].ravel()[edge]
        parts.append(_best_per_pair(la[edge], lb[edge], np.minimum(f[ca], f[cb]), ca, cb))
    return _best_per_pair(*(np.concatenate(p) for p in zip(*parts)))


def _best_per_pair(la, lb, value, ca, cb):
    """Keep, for each unordered basin pair, the entry with the highest value (ordered a < b)."""
    swap = la > lb
    la, lb = np.where(swap, lb, la), np.where(swap, la, lb)
    ca, cb = np.where(swap, cb, ca), np.where(swap, ca, cb)
    order = np.lexsort((-value, lb, la))
    la, lb, value, ca, cb = la[order], lb[order], value[order], ca[order], cb[order]
    first = np.ones(la.size, bool)
    first[1:] = (la[1:] != la[:-1]) | (lb[1:] != lb[:-1])
    return la[first], lb[first], value[first], ca[first], cb[first]


def _find(parent: dict, x: int) -> int:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return root


def filament_skeleton(field: np.ndarray, sigma: np.ndarray, nsigma: float = 3.0) -> GridSkeleton:
    """The persistence-filtered filament skeleton of a density grid.

    Parameters
    ----------
    field
        Smoothed density (e.g. ``1 + delta``) on a 3-D grid; NaN / ``-inf`` = masked.
    sigma
        Poisson noise of ``field`` per cell (same shape), for the significance of pairs.
    nsigma
        Cut on the significance of the (maximum, saddle) persistence pairs.
    """
    field = np.asarray(field, dtype=np.float32)
    valid = np.isfinite(field)
    ptr = ascent_pointers(field)
    label = basin_labels(ptr)
    flat = field.ravel()
    sig = np.asarray(sigma, dtype=np.float64).ravel()
    maxima = np.flatnonzero((label == np.arange(label.size)) & valid.ravel())
    ma, mb, sval, ca, cb = basin_saddles(field, label, valid)

    # merge tree: saddles by decreasing density, union-find over maxima
    parent = {int(m): int(m) for m in maxima}
    death: dict[int, int] = {}  # maximum -> index of the saddle that kills it
    signif = np.full(sval.size, np.nan)
    for s in np.argsort(-sval, kind="stable"):
        ra, rb = _find(parent, int(ma[s])), _find(parent, int(mb[s]))
        if ra == rb:
            continue  # a loop-closing saddle (paired with a 1-saddle in DisPerSE): not kept
        young, old = (ra, rb) if flat[ra] < flat[rb] else (rb, ra)
        saddle_cell = ca[s] if flat[ca[s]] <= flat[cb[s]] else cb[s]
        noise = np.hypot(sig[young], sig[saddle_cell])
        signif[s] = (flat[young] - sval[s]) / noise if noise > 0 else np.inf
        death[young] = int(s)
        parent[young] = old
    kept = np.flatnonzero(signif >= nsigma)
    cancelled = {m for m, s in death.items() if not signif[s] >= nsigma}

    # arcs: each kept saddle, plus the saddles that carry arcs on past cancelled maxima
    arc_saddle: dict[int, float] = {int(s): float(signif[s]) for s in kept}
    todo = [(int(m), float(signif[s])) for s in kept for m in (ma[s], mb[s])]
    while todo:
        m, p = todo.pop()
        if m in cancelled:
            s = death[m]
            if arc_saddle.get(s, -np.inf) < p:
                arc_saddle[s] = p
                todo.extend((int(x), p) for x in (ma[s], mb[s]) if int(x) != m)
    if not arc_saddle:
        empty = np.empty(0, np.int64)
        return GridSkeleton(empty, empty, np.empty(0), int(maxima.size), 0)
    sad = np.fromiter(arc_saddle, dtype=np.int64)
    pers = np.fromiter(arc_saddle.values(), dtype=np.float64)
    starts, ends, seg_p = [ca[sad]], [cb[sad]], [pers]  # the bridge through the saddle
    cur = np.concatenate([ca[sad], cb[sad]])
    cur_p = np.concatenate([pers, pers])
    while cur.size:
        order = np.lexsort((-cur_p, cur))  # merge walkers that met, keep the highest significance
        cur, cur_p = cur[order], cur_p[order]
        first = np.ones(cur.size, bool)
        first[1:] = cur[1:] != cur[:-1]
        cur, cur_p = cur[first], cur_p[first]
        nxt = ptr[cur]
        moving = nxt != cur
        starts.append(cur[moving])
        ends.append(nxt[moving])
        seg_p.append(cur_p[moving])
        cur, cur_p = nxt[moving], cur_p[moving]
    start, end, p = np.concatenate(starts), np.concatenate(ends), np.concatenate(seg_p)
    # a segment walked by several arcs appears once, with its highest significance
    order = np.lexsort((-p, end, start))
    start, end, p = start[order], end[order], p[order]
    first = np.ones(start.size, bool)
    first[1:] = (start[1:] != start[:-1]) | (end[1:] != end[:-1])
    return GridSkeleton(start[first], end[first], p[first], int(maxima.size), int(kept.size))


def cell_centres(flat_index: np.ndarray, shape: tuple[int, int, int], origin: np.ndarray, cell: float) -> np.ndarray:
    """Physical coordinates ``(m, 3)`` of the centres of flat cell indices."""
    ijk = np.stack(np.unravel_index(flat_index, shape), axis=-1)
    return np.asarray(origin, float)[None, :] + (ijk + 0.5) * cell


def distance_to_segments(points: np.ndarray, seg_start: np.ndarray, seg_end: np.ndarray, k: int = 8, workers: int = 1) -> np.ndarray:
    """Euclidean distance from each point to the nearest segment (NaN if there are none).

    Candidates are the ``k`` segments with the nearest midpoints; the exact
    point-segment distance is taken over them. Segments are short (a grid step)
    so the nearest segment is among them.
    """
    points = np.asarray(points, dtype=np.float64)
    out = np.full(len(points), np.nan)
    if len(seg_start) == 0:
        return out
    a, b = np.asarray(seg_start, float), np.asarray(seg_end, float)
    good = np.all(np.isfinite(points), axis=1)
    k = min(k, len(a))
    tree = cKDTree(0.5 * (a + b))
    idx = np.flatnonzero(good)
    for start in range(0, idx.size, _CHUNK):  # chunks bound the (chunk, k, 3) temporaries
        sel = idx[start : start + _CHUNK]
        _, j = tree.query(points[sel], k=k, workers=workers)
        j = j.reshape(-1, k)
        p = points[sel][:, None, :]
        ab = (b - a)[j]
        ap = p - a[j]
        t = np.clip(np.sum(ap * ab, axis=-1) / np.maximum(np.sum(ab * ab, axis=-1), 1e-300), 0.0, 1.0)
        out[sel] = np.linalg.norm(ap - t[..., None] * ab, axis=-1).min(axis=1)
    return out
