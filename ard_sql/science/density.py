"""Local galaxy density: projected Sigma_N (Baldry et al. 2006) and a 3-D kNN density.

Sigma_N
    ``Sigma_N = N / (pi d_N^2)`` in comoving Mpc^-2, where ``d_N`` is the projected
    comoving distance (transverse comoving distance at the galaxy's redshift times
    the angular separation) to the N-th nearest member of the *density-defining
    population* within ``+-dv`` (default 1000 km/s) along the line of sight,
    i.e. ``|ln(1+z_j) - ln(1+z_i)| <= ln(1 + dv/c)`` (``|dz| <~ (1+z) dv / c``).
    The galaxy itself is never its own neighbour.

Density-defining population
    Chosen by the caller (``ard_sql.build.layers.topology``): by default every
    galaxy with a reliable redshift (ZWARN == 0, SPECTYPE GALAXY); optionally
    only those brighter than an absolute-magnitude limit (a volume-limited tracer).
    With a flux-limited tracer Sigma_N falls with redshift with the tracer's
    number density: compare galaxies at similar redshift.

Footprint flag
    A galaxy whose circle of radius ``d_N`` (angle ``d_N / D_M``) reaches outside
    the survey's HEALPix coverage map is flagged: its Sigma_N is biased low.

3-D kNN density
    ``n_k = k / (4/3 pi r_k^3)`` in comoving Mpc^-3, ``r_k`` the 3-D distance to the
    k-th nearest tracer (k = 5 by default), no velocity window (redshift space).

Neighbour searches use ``scipy.spatial.cKDTree``. The projected search runs in
slabs of ``ln(1+z)`` one velocity window wide: a tree of the tracers in three
adjacent slabs answers the galaxies of the middle slab, so memory stays that of
a few slabs and the cylinder cut is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import healpy as hp
import numpy as np
from scipy.spatial import cKDTree

from ard_sql.science.positions import C_KMS, unit_vectors


# ---------------------------------------------------------------- footprint
@dataclass
class Footprint:
    """A HEALPix (NESTED) coverage map of the survey."""

    nside: int
    covered: np.ndarray
    """bool (12 nside^2,): True where the survey observed."""

    @classmethod
    def from_positions(
        cls, ra: np.ndarray, dec: np.ndarray, nside: int | None = None, min_mean_count: float = 8.0
    ) -> Footprint:
        """Coverage map from the galaxies themselves: pixels holding at least one galaxy.

        Without ``nside``, the finest power of two (<= 1024) is used at which the
        occupied pixels hold ``min_mean_count`` galaxies on average, so that
        holes in the map are holes in the survey rather than shot noise.
        """
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        if ra.size == 0:
            raise ValueError("cannot build a footprint from zero positions")
        if nside is None:
            nside = 1
            for candidate in (2**k for k in range(1, 11)):
                counts = np.bincount(hp.ang2pix(candidate, ra, dec, nest=True, lonlat=True))
                if ra.size / np.count_nonzero(counts) < min_mean_count:
                    break
                nside = candidate
        pix = hp.ang2pix(nside, ra, dec, nest=True, lonlat=True)
        covered = np.zeros(hp.nside2npix(nside), dtype=bool)
        covered[pix] = True
        return cls(int(nside), covered)

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """True where (RA, DEC) in degrees falls in a covered pixel."""
        return self.covered[hp.ang2pix(self.nside, np.asarray(ra, float), np.asarray(dec, float), nest=True, lonlat=True)]

    @property
    def area_deg2(self) -> float:
        """Covered area in square degrees."""
        return float(self.covered.sum() * hp.nside2pixarea(self.nside, degrees=True))

    def edge_angle(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Conservative angular distance (radians) from each position to the footprint edge.

        The distance to the nearest centre of an uncovered pixel that touches the
        footprint, minus the largest pixel radius; 0 outside the footprint, inf for
        a full-sky map.
        """
        covered_pix = np.flatnonzero(self.covered)
        neigh = hp.get_all_neighbours(self.nside, covered_pix, nest=True).ravel()
        neigh = np.unique(neigh[neigh >= 0])
        edge_pix = neigh[~self.covered[neigh]]
        out = np.full(np.shape(ra), np.inf)
        if edge_pix.size:
            centres = np.stack(hp.pix2vec(self.nside, edge_pix, nest=True), axis=-1)
            chord, _ = cKDTree(centres).query(unit_vectors(ra, dec))
            angle = 2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))
            out = np.maximum(angle - hp.max_pixrad(self.nside), 0.0)
        out[~self.contains(ra, dec)] = 0.0
        return out

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` random (RA, DEC) in degrees, uniform over the covered area.

        Draws a covered pixel, then one of its 4^6 NESTED children (uniform at
        64x finer resolution), then a point jittered within the child (kept inside the parent).
        """
        covered_pix = np.flatnonzero(self.covered)
        parent = rng.choice(covered_pix, size=n)
        fine = self.nside * 64
        child = parent.astype(np.int64) * 4096 + rng.integers(0, 4096, size=n)
        centre = np.stack(hp.pix2vec(fine, child, nest=True), axis=-1)
        vec = centre + rng.normal(scale=0.3 * hp.nside2resol(fine), size=centre.shape)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        # a jitter that left its parent pixel falls back to the child's centre
        strayed = hp.vec2pix(self.nside, vec[:, 0], vec[:, 1], vec[:, 2], nest=True) != parent
        vec[strayed] = centre[strayed]
        dec = np.degrees(np.arcsin(np.clip(vec[:, 2], -1, 1)))
        ra = np.degrees(np.arctan2(vec[:, 1], vec[:, 0])) % 360.0
        return ra, dec


# ---------------------------------------------------------------- Sigma_N
@dataclass
class ProjectedDensity:
    """Result of :func:`projected_density` for each queried galaxy."""

    n: tuple[int, ...]
    d_n: np.ndarray
    """(n_gal, len(n)) projected comoving distance to the N-th neighbour, Mpc; NaN if too few."""
    sigma: np.ndarray
    """(n_gal, len(n)) Sigma_N = N / (pi d_N^2), Mpc^-2; NaN if too few neighbours."""
    theta: np.ndarray
    """(n_gal, len(n)) angular radius of the d_N circle, radians."""


def projected_density(
    ra: np.ndarray,
    dec: np.ndarray,
    z: np.ndarray,
    transverse_distance: np.ndarray,
    tracer: np.ndarray,
    n: Sequence[int] = (5, 10),
    dv_kms: float = 1000.0,
    workers: int = 1,
) -> ProjectedDensity:
    """Sigma_N for every galaxy, counting neighbours from the tracer population.

    Parameters
    ----------
    ra, dec, z
        Positions (degrees) and redshifts of all galaxies to evaluate (NaN z gives NaN).
    transverse_distance
        Transverse comoving distance ``D_M(z)`` of each galaxy, Mpc (``positions.DistanceTable``).
    tracer
        bool mask: which galaxies belong to the density-defining population.
    n
        Neighbour ranks (5 and 10 for Sigma_5, Sigma_10).
    dv_kms
        Half-width of the line-of-sight velocity window.
    workers
        Threads for ``cKDTree.query``.
    """
    ra, dec, z = (np.asarray(a, dtype=np.float64) for a in (ra, dec, z))
    tracer = np.asarray(tracer, dtype=bool) & np.isfinite(z)
    ranks = tuple(int(k) for k in n)
    n_max = max(ranks)
    n_gal = z.size
    d_n = np.full((n_gal, len(ranks)), np.nan)
    theta = np.full((n_gal, len(ranks)), np.nan)

    y = np.log1p(z)
    half = float(np.log1p(dv_kms / C_KMS))  # ln(1+z) half-window, upper side
    width = float(-np.log1p(-dv_kms / C_KMS))  # lower side is slightly wider: slab width covers both
    vec = unit_vectors(ra, dec)
    valid = np.isfinite(y)
    if not np.any(tracer) or not np.any(valid):
        return ProjectedDensity(ranks, d_n, d_n.copy(), theta)
    y0 = np.nanmin(y[valid])
    slab = np.full(n_gal, -1, dtype=np.int64)
    slab[valid] = np.floor((y[valid] - y0) / width).astype(np.int64)
    tr_idx = np.flatnonzero(tracer)
    tr_order = tr_idx[np.argsort(slab[tr_idx], kind="stable")]
    tr_slab = slab[tr_order]
    n_slabs = int(slab.max()) + 1
    tr_bounds = np.searchsorted(tr_slab, np.arange(n_slabs + 2))
    q_order = np.flatnonzero(valid)
    q_order = q_order[np.argsort(slab[q_order], kind="stable")]
    q_bounds = np.searchsorted(slab[q_order], np.arange(n_slabs + 1))

    for s in range(n_slabs):
        queries = q_order[q_bounds[s] : q_bounds[s + 1]]
        if queries.size == 0:
            continue
        cand = tr_order[tr_bounds[max(s - 1, 0)] : tr_bounds[min(s + 2, n_slabs)]]
        if cand.size == 0:
            continue
        tree = cKDTree(vec[cand])
        pending = queries
        k = min(cand.size, 4 * n_max + 4)
        while pending.size:
            chord, j = tree.query(vec[pending], k=k, workers=workers)
            chord = chord.reshape(pending.size, -1)
            j = j.reshape(pending.size, -1)
            hit = j < cand.size
            jj = np.where(hit, j, 0)
            dy = y[cand[jj]] - y[pending][:, None]
            ok = hit & (dy <= half) & (dy >= -width) & (cand[jj] != pending[:, None])
            count = ok.sum(axis=1)
            enough = count >= n_max
            exhausted = k >= cand.size
            done = enough | exhausted
            rank_pos = np.cumsum(ok, axis=1)
            for c, r in enumerate(ranks):
                sel = done & (count >= r)
                col = np.argmax((rank_pos == r) & ok, axis=1)
                ang = 2.0 * np.arcsin(np.clip(chord[np.arange(pending.size), col] / 2.0, 0.0, 1.0))
                theta[pending[sel], c] = ang[sel]
            pending = pending[~done]
            k = min(cand.size, 2 * k)
    d_n = theta * np.asarray(transverse_distance, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore"):
        sigma = np.asarray(ranks, float)[None, :] / (np.pi * d_n**2)
    return ProjectedDensity(ranks, d_n, sigma, theta)


def knn_density_3d(
    positions: np.ndarray, tracer_positions: np.ndarray, k: int = 5, self_in_tracers: np.ndarray | None = None, workers: int = 1
) -> np.ndarray:
    """3-D kNN number density ``k / (4/3 pi r_k^3)`` (Mpc^-3) at each position.

    ``self_in_tracers`` (bool per position) says which positions are themselves
    tracers, whose zero-distance self-match is skipped.
    """
    positions = np.asarray(positions, dtype=np.float64)
    out = np.full(len(positions), np.nan)
    good = np.all(np.isfinite(positions), axis=1)
    tracer_positions = np.asarray(tracer_positions, dtype=np.float64)
    if tracer_positions.shape[0] <= k or not np.any(good):
        return out
    tree = cKDTree(tracer_positions)
    dist, _ = tree.query(positions[good], k=k + 1, workers=workers)
    is_self = np.zeros(len(positions), bool) if self_in_tracers is None else np.asarray(self_in_tracers, bool)
    r_k = np.where(is_self[good], dist[:, k], dist[:, k - 1])
    with np.errstate(divide="ignore"):
        out[good] = k / (4.0 / 3.0 * np.pi * r_k**3)
    return out
