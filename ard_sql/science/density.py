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

from collections.abc import Callable, Sequence
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

    def contains_vec(self, vec: np.ndarray) -> np.ndarray:
        """True where the direction of ``vec`` (n, 3), any length > 0, falls in a covered pixel."""
        vec = np.asarray(vec, dtype=np.float64)
        return self.covered[hp.vec2pix(self.nside, vec[:, 0], vec[:, 1], vec[:, 2], nest=True)]

    @property
    def sky_fraction(self) -> float:
        """Covered area over the full sky."""
        return float(self.covered.mean())

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


# ---------------------------------------------------------------- selection function
@dataclass
class SurveySelection:
    """Expected number density of the tracers, ``n(r) x footprint(direction)``, in Mpc^-3.

    The random catalogue of a survey, without the randoms: the radial part
    ``n(r)`` is the tracers' own comoving-distance distribution divided by the
    shell volume of the footprint and **smoothed** with a Gaussian of
    ``radial_smoothing`` Mpc (the usual ``n(z)`` fit). Smoothing matters: randoms
    whose redshifts are copied from the tracers ("shuffled") inherit the radial
    clustering, which in a narrow field cancels a large part of the signal
    (``tests/test_topology_layer.py`` and bench/RESULTS.md show the effect). The
    angular part is the HEALPix coverage map. No shot noise, and no 10x random
    catalogue to hold in memory.
    """

    footprint: Footprint
    edges: np.ndarray
    """Comoving-distance bin edges, Mpc."""
    nbar: np.ndarray
    """Smoothed number density per bin, Mpc^-3 (zero outside ``edges``)."""

    @classmethod
    def from_tracers(
        cls, footprint: Footprint, distance: np.ndarray, radial_smoothing: float = 50.0, bin_mpc: float = 2.0
    ) -> SurveySelection:
        """Fit ``n(r)`` to the tracers' comoving distances ``distance`` (Mpc)."""
        from scipy.ndimage import gaussian_filter1d

        r = np.asarray(distance, float)
        r = r[np.isfinite(r)]
        if r.size == 0:
            raise ValueError("cannot fit a selection function to zero tracers")
        lo, hi = float(r.min()), float(r.max())
        nbin = max(1, int(np.ceil((hi - lo) / bin_mpc)))
        edges = np.linspace(lo, hi, nbin + 1)
        if hi <= lo:
            edges = np.array([lo, lo + bin_mpc])
        counts, _ = np.histogram(r, bins=edges)
        shell = 4.0 / 3.0 * np.pi * np.diff(edges**3) * footprint.sky_fraction
        dens = counts / shell
        if radial_smoothing > 0 and nbin > 1:
            # smooth the number of tracers at fixed total (so the mean density is kept)
            dens = gaussian_filter1d(dens, radial_smoothing / (edges[1] - edges[0]), mode="nearest")
            dens *= r.size / max(float(np.sum(dens * shell)), 1e-300)
        return cls(footprint, edges, dens)

    def radial(self, r: np.ndarray) -> np.ndarray:
        """``n(r)`` in Mpc^-3 (zero outside the tracers' range)."""
        r = np.asarray(r, float)
        i = np.searchsorted(self.edges, r, side="right") - 1
        inside = (i >= 0) & (i < self.nbar.size) | (r == self.edges[-1])
        return np.where(inside, self.nbar[np.clip(i, 0, self.nbar.size - 1)], 0.0)

    def density(self, xyz: np.ndarray) -> np.ndarray:
        """Expected tracer density at comoving positions ``(n, 3)`` (observer at the origin)."""
        xyz = np.asarray(xyz, float)
        n = self.radial(np.linalg.norm(xyz, axis=1))
        pos = n > 0
        if pos.any():
            n[pos] *= self.footprint.contains_vec(xyz[pos])
        return n

    def ball_coverage(self, xyz: np.ndarray, radius: float | np.ndarray, edge_angle: np.ndarray | None = None,
                      n_points: int = 64, batch: int = 20000) -> np.ndarray:
        """Fraction of the ball of ``radius`` (Mpc; one value, or one per position) around each position inside the survey.

        Inside means where the selection is non-zero (footprint and the radial range
        of ``n(r)``). Read at ``n_points`` fixed points spread uniformly in the ball
        (the same for every position, so the result is deterministic).
        ``edge_angle`` (radians, ``Footprint.edge_angle`` of the positions), when
        given, skips the positions the ball cannot reach out of: footprint edge
        farther than the ball's angular radius arcsin(radius / r) and both radial
        ends farther than ``radius``; their coverage is 1. A non-finite radius
        gives NaN.
        """
        xyz = np.asarray(xyz, float)
        radius = np.broadcast_to(np.asarray(radius, float), (len(xyz),))
        finite = np.isfinite(radius)
        out = np.where(finite, 1.0, np.nan)
        r = np.linalg.norm(xyz, axis=1)
        with np.errstate(invalid="ignore"):
            near = np.minimum(r - self.edges[0], self.edges[-1] - r) < radius
            if edge_angle is None:
                near[:] = True
            else:
                reach = np.arcsin(np.clip(radius / np.maximum(r, 1e-12), 0.0, 1.0))
                near |= np.asarray(edge_angle, float) < reach
        near &= finite
        # a golden-angle spiral of directions, radii uniform in volume (stratified, in a fixed shuffle)
        k = np.arange(n_points) + 0.5
        cos_t, phi = 1.0 - 2.0 * k / n_points, np.pi * (1.0 + 5.0**0.5) * k
        sin_t = np.sqrt(1.0 - cos_t**2)
        ball = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=1)
        ball *= ((np.random.default_rng(0).permutation(n_points) + 0.5) / n_points)[:, None] ** (1 / 3)
        idx = np.flatnonzero(near)
        for s in range(0, idx.size, batch):
            rows = idx[s:s + batch]
            p = (xyz[rows, None, :] + radius[rows, None, None] * ball[None]).reshape(-1, 3)
            out[rows] = (self.density(p) > 0).reshape(rows.size, n_points).mean(axis=1)
        return out

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` random positions ``(n, 3)`` following the selection (for those who want randoms)."""
        shell = 4.0 / 3.0 * np.pi * np.diff(self.edges**3)
        cdf = np.cumsum(self.nbar * shell)
        b = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(n)), self.nbar.size - 1)
        r3 = self.edges[b] ** 3 + rng.random(n) * (self.edges[b + 1] ** 3 - self.edges[b] ** 3)
        ra, dec = self.footprint.sample(n, rng)
        return unit_vectors(ra, dec) * np.cbrt(r3)[:, None]


# ---------------------------------------------------------------- Sigma_N
@dataclass
class ProjectedDensity:
    """Result of :func:`projected_density` for each queried galaxy."""

    n: tuple[int, ...]
    d_n: np.ndarray
    """(n_gal, len(n)) projected comoving distance to the N-th neighbour, Mpc; NaN if too few."""
    sigma: np.ndarray
    """(n_gal, len(n)) Sigma_N = N / (pi d_N^2), Mpc^-2; NaN if too few neighbours or d_N = 0 (coincident neighbours)."""
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
    sigma = np.full(d_n.shape, np.nan)
    ok = np.isfinite(d_n) & (d_n > 0)  # d_N = 0: N neighbours on the same line of sight, no finite density
    sigma[ok] = (np.asarray(ranks, float)[None, :] * np.ones_like(d_n))[ok] / (np.pi * d_n[ok] ** 2)
    return ProjectedDensity(ranks, d_n, sigma, theta)


def knn_radius_3d(
    positions: np.ndarray, tracer_positions: np.ndarray, k: int = 5, self_in_tracers: np.ndarray | None = None, workers: int = 1
) -> np.ndarray:
    """Distance r_k (Mpc) from each position to its ``k``-th nearest tracer.

    ``self_in_tracers`` (bool per position) says which positions are themselves
    tracers, whose zero-distance self-match is skipped. NaN where the position
    is not finite or there are no more than ``k`` tracers; 0 where ``k`` other
    tracers coincide with the position (duplicate positions).
    """
    positions = np.asarray(positions, dtype=np.float64)
    out = np.full(len(positions), np.nan)
    good = np.all(np.isfinite(positions), axis=1)
    tracer_positions = np.asarray(tracer_positions, dtype=np.float64)
    if tracer_positions.shape[0] <= k or not np.any(good):
        return out
    tree = cKDTree(tracer_positions)
    is_self = np.zeros(len(positions), bool) if self_in_tracers is None else np.asarray(self_in_tracers, bool)
    idx = np.flatnonzero(good)
    for start in range(0, idx.size, 1 << 20):  # blocks bound the (block, k+1) neighbour arrays
        sel = idx[start : start + (1 << 20)]
        dist, _ = tree.query(positions[sel], k=k + 1, workers=workers)
        out[sel] = np.where(is_self[sel], dist[:, k], dist[:, k - 1])
    return out


def knn_density_from_radius(r_k: np.ndarray, k: int) -> np.ndarray:
    """``k / (4/3 pi r_k^3)`` (Mpc^-3); NaN where ``r_k`` is NaN or 0 (coincident tracers: no finite density)."""
    r_k = np.asarray(r_k, dtype=np.float64)
    out = np.full(r_k.shape, np.nan)
    ok = np.isfinite(r_k) & (r_k > 0)
    out[ok] = k / (4.0 / 3.0 * np.pi * r_k[ok] ** 3)
    return out


def knn_density_3d(
    positions: np.ndarray, tracer_positions: np.ndarray, k: int = 5, self_in_tracers: np.ndarray | None = None, workers: int = 1
) -> np.ndarray:
    """3-D kNN number density ``k / (4/3 pi r_k^3)`` (Mpc^-3) at each position.

    ``self_in_tracers`` (bool per position) says which positions are themselves
    tracers, whose zero-distance self-match is skipped. NaN (never inf) where
    it cannot be computed: too few tracers, a non-finite position, or ``k``
    tracers coinciding with the position (r_k = 0); :func:`knn_radius_3d`
    tells these apart.
    """
    return knn_density_from_radius(knn_radius_3d(positions, tracer_positions, k, self_in_tracers, workers), k)


# ---------------------------------------------------------------- fingers of God
@dataclass
class FogGroups:
    """Result of :func:`compress_fingers_of_god`."""

    positions: np.ndarray
    """(n, 3) positions with the groups' radial extent compressed (Mpc)."""
    group: np.ndarray
    """(n,) group id (every galaxy has one; singletons are their own group)."""
    size: np.ndarray
    """(n,) number of members of each galaxy's group."""


def compress_fingers_of_god(
    xyz: np.ndarray,
    nbar_of_r: Callable[[np.ndarray], np.ndarray],
    b_perp: float = 0.2,
    los_ratio: float = 10.0,
    min_members: int = 3,
    workers: int = 1,
) -> FogGroups:
    """Find friends-of-friends groups in redshift space and undo their fingers of God.

    Galaxies are linked when their transverse separation is below
    ``b_perp * nbar(r)^(-1/3)`` and their line-of-sight separation below
    ``los_ratio`` times that (Eke et al. 2004 use b_perp = 0.13, ratio 11; Tempel
    et al. 2014 link with a length growing with distance as here, through the
    local mean density ``nbar_of_r``). In each group of at least ``min_members`` the
    radial offsets from the group centre are scaled so that their rms equals
    the rms of one transverse component (Tempel et al. 2014, sect. 2.3): the
    virial motions that stretch a group along the line of sight are removed,
    while the group's centre keeps its measured redshift.

    Pairs are found in slabs of comoving distance one line-of-sight linking
    length thick (a tree of unit vectors per three slabs), so memory stays that
    of a few slabs.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    xyz = np.asarray(xyz, dtype=np.float64)
    n = len(xyz)
    r = np.linalg.norm(xyz, axis=1)
    good = np.isfinite(r) & (r > 0)
    nb = np.where(good, nbar_of_r(np.where(good, r, 0.0)), 0.0)
    link_perp = np.where(nb > 0, b_perp * np.maximum(nb, 1e-30) ** (-1.0 / 3.0), 0.0)
    link_par = los_ratio * link_perp
    out = xyz.copy()
    if not good.any():
        ids = np.arange(n)
        return FogGroups(out, ids, np.ones(n, np.int64))
    u = np.zeros_like(xyz)
    u[good] = xyz[good] / r[good, None]
    width = float(np.max(link_par[good]))
    if width <= 0:
        ids = np.arange(n)
        return FogGroups(out, ids, np.ones(n, np.int64))
    r0 = float(r[good].min())
    slab = np.full(n, -1, np.int64)
    slab[good] = np.floor((r[good] - r0) / width).astype(np.int64)
    order = np.flatnonzero(good)
    order = order[np.argsort(slab[order], kind="stable")]
    n_slabs = int(slab.max()) + 1
    bounds = np.searchsorted(slab[order], np.arange(n_slabs + 2))
    rows, cols = [], []
    for s in range(n_slabs):
        mine = order[bounds[s] : bounds[s + 1]]
        if mine.size == 0:
            continue
        cand = order[bounds[s] : bounds[min(s + 2, n_slabs)]]  # this slab and the next: each pair once
        r_min = max(float(r[mine].min()), 1e-6)
        max_angle = float(link_perp[cand].max()) / r_min
        tree_c = cKDTree(u[cand])
        tree_m = cKDTree(u[mine])
        pairs = tree_m.sparse_distance_matrix(tree_c, 2.0 * np.sin(0.5 * min(max_angle, np.pi)), output_type="coo_matrix")
        i, j = mine[pairs.row], cand[pairs.col]
        keep = i < j
        i, j = i[keep], j[keep]
        if i.size == 0:
            continue
        d_par = np.abs(r[i] - r[j])
        rm = 0.5 * (r[i] + r[j])
        cosang = np.clip(np.sum(u[i] * u[j], axis=1), -1.0, 1.0)
        d_perp = rm * np.sqrt(np.maximum(2.0 * (1.0 - cosang), 0.0))
        lp = 0.5 * (link_perp[i] + link_perp[j])
        ok = (d_perp <= lp) & (d_par <= los_ratio * lp)
        rows.append(i[ok])
        cols.append(j[ok])
    if rows:
        ri, ci = np.concatenate(rows), np.concatenate(cols)
    else:
        ri = ci = np.empty(0, np.int64)
    graph = coo_matrix((np.ones(ri.size, np.int8), (ri, ci)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    size = np.bincount(group)[group]
    big = np.flatnonzero((size >= min_members) & good)
    if big.size:
        g = group[big]
        uniq, inv = np.unique(g, return_inverse=True)
        cnt = np.bincount(inv).astype(float)
        centre = np.stack([np.bincount(inv, weights=xyz[big, a]) for a in range(3)], axis=1) / cnt[:, None]
        r_c = np.linalg.norm(centre, axis=1)
        los = centre / r_c[:, None]
        off = xyz[big] - centre[inv]
        par = np.sum(off * los[inv], axis=1)
        perp = off - par[:, None] * los[inv]
        var_par = np.bincount(inv, weights=par**2) / cnt
        var_perp = np.bincount(inv, weights=np.sum(perp**2, axis=1)) / (2.0 * cnt)  # per component
        scale = np.where(var_par > var_perp, np.sqrt(var_perp / np.maximum(var_par, 1e-300)), 1.0)
        out[big] = centre[inv] + perp + (scale[inv] * par)[:, None] * los[inv]
    return FogGroups(out, group, size)
