"""T-web classification of a density field on a grid (Hahn et al. 2007; Forero-Romero et al. 2009).

The tidal tensor is the Hessian of the normalised gravitational potential
``phi`` with ``laplacian(phi) = delta``, so that its trace is the (smoothed)
overdensity. In Fourier space ``T_ij(k) = k_i k_j / k^2 * delta(k) * W(k R)``
with a Gaussian window ``W = exp(-k^2 R^2 / 2)``. Each grid cell is then
classified by the number of eigenvalues above a threshold ``lambda_th``:
0 Void, 1 Sheet, 2 Filament, 3 Knot (Hahn et al. 2007 use ``lambda_th = 0``,
Forero-Romero et al. 2009 advocate 0.2-0.4 for dark matter; the value suited
to a galaxy field depends on its bias and shot noise and is set by the layer).

The grid is periodic (FFT). A survey sits inside a larger box padded with
``delta = 0`` (mean density) and masked cells are handled by the caller
(``classify_tweb`` returns -1 where eigenvalues are NaN).

Public API (names are stable; the mock truth uses them too):

- :func:`tidal_eigenvalues` -- eigenvalues ``lambda1 >= lambda2 >= lambda3`` per cell.
- :func:`classify_tweb` -- int8 class codes from eigenvalues.
- :func:`tidal_tensor` -- the six independent components (for those who need them).
- :func:`symmetric_eigenvalues` -- closed-form eigenvalues of many symmetric 3x3 matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING

import numpy as np
from scipy import fft as sfft

if TYPE_CHECKING:  # for annotations only: density does not need cosmicweb, keep it that way
    from ard_sql.science.density import SurveySelection

#: Class names by code; the ENUM ``WEB_CLASS`` in the views uses the same order.
WEB_CLASS_NAMES: tuple[str, ...] = ("Void", "Sheet", "Filament", "Knot")
#: Code returned by :func:`classify_tweb` where a cell is masked (NaN eigenvalues).
MASKED_CODE: int = -1

#: Tensor component order of :func:`tidal_tensor`: xx, yy, zz, xy, xz, yz.
_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
#: Cells per block in the eigenvalue loop (bounds the float64 temporaries to ~100 MB).
_BLOCK = 1 << 21


def _box_lengths(shape: Sequence[int], box_size: float | Sequence[float]) -> np.ndarray:
    lengths = np.broadcast_to(np.asarray(box_size, dtype=float), (3,)).copy()
    if len(shape) != 3:
        raise ValueError(f"tidal tensor needs a 3-D grid, got shape {tuple(shape)}")
    if np.any(~np.isfinite(lengths)) or np.any(lengths <= 0):
        raise ValueError(f"box_size must be positive and finite, got {box_size!r}")
    return lengths


def _wavenumbers(shape: Sequence[int], lengths: np.ndarray) -> list[np.ndarray]:
    """Angular wavenumbers (rad / length unit) for an rfftn of ``shape``, broadcastable."""
    kx = 2 * np.pi * sfft.fftfreq(shape[0], d=lengths[0] / shape[0])
    ky = 2 * np.pi * sfft.fftfreq(shape[1], d=lengths[1] / shape[1])
    kz = 2 * np.pi * sfft.rfftfreq(shape[2], d=lengths[2] / shape[2])
    return [kx[:, None, None].astype(np.float32), ky[None, :, None].astype(np.float32), kz[None, None, :].astype(np.float32)]


def tidal_tensor(
    delta: np.ndarray,
    box_size: float | Sequence[float],
    smoothing: float,
    workers: int | None = None,
    short_range: float = 0.0,
) -> np.ndarray:
    """Tidal tensor of the Gaussian-smoothed overdensity on a periodic grid.

    Parameters
    ----------
    delta
        Overdensity ``rho / mean - 1`` on a 3-D grid (any float dtype; NaN not allowed:
        fill masked cells with 0 before calling).
    box_size
        Side length of the periodic box (e.g. Mpc), one value or one per axis.
    smoothing
        Gaussian smoothing radius ``R`` in the same unit (0 means none).
    workers
        Threads for scipy.fft (default: scipy's default, 1).
    short_range
        If > 0, keep only the short-range part of the tide, multiplying by
        ``1 - exp(-k^2 L^2 / 2)`` with ``L = short_range`` (a TreePM-like split: the
        long-range rest is the tide smoothed by ``L``, computed on a coarse grid).

    Returns
    -------
    np.ndarray
        float32 array of shape ``(6, *delta.shape)``: components xx, yy, zz, xy, xz, yz.
    """
    delta = np.asarray(delta)
    lengths = _box_lengths(delta.shape, box_size)
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta contains NaN or inf; fill masked cells (e.g. with 0) before the FFT")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    k = _wavenumbers(delta.shape, lengths)
    dk = sfft.rfftn(delta.astype(np.float32, copy=False), workers=workers)
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    window = np.exp(-0.5 * k2 * np.float32(smoothing) ** 2)
    if short_range > 0:
        window *= 1.0 - np.exp(-0.5 * k2 * np.float32(short_range) ** 2)
    k2[0, 0, 0] = 1.0  # the k=0 mode of delta carries no tide; avoid 0/0
    dk *= window / k2
    dk[0, 0, 0] = 0.0
    del window, k2
    out = np.empty((6, *delta.shape), dtype=np.float32)
    for c, (i, j) in enumerate(_PAIRS):
        out[c] = sfft.irfftn(dk * (k[i] * k[j]), s=delta.shape, workers=workers)
    return out


def symmetric_eigenvalues(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, xy: np.ndarray, xz: np.ndarray,
                          yz: np.ndarray) -> np.ndarray:
    """Closed-form eigenvalues of symmetric 3x3 matrices, sorted ``l1 >= l2 >= l3``.

    Uses the trigonometric solution of the characteristic cubic (Smith 1961),
    in float64; about 10x faster than ``numpy.linalg.eigvalsh`` on (n, 3, 3).
    Inputs are 1-D arrays of equal length; returns an ``(n, 3)`` float64 array.
    """
    xx, yy, zz, xy, xz, yz = (np.asarray(a, dtype=np.float64) for a in (xx, yy, zz, xy, xz, yz))
    q = (xx + yy + zz) / 3.0
    p1 = xy * xy + xz * xz + yz * yz
    axx, ayy, azz = xx - q, yy - q, zz - q
    p2 = axx * axx + ayy * ayy + azz * azz + 2.0 * p1
    p = np.sqrt(p2 / 6.0)
    safe = np.where(p > 0, p, 1.0)
    # det(B)/2 with B = (A - qI)/p
    det = axx * (ayy * azz - yz * yz) - xy * (xy * azz - yz * xz) + xz * (xy * yz - ayy * xz)
    r = np.clip(det / (2.0 * safe**3), -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    l1 = q + 2.0 * p * np.cos(phi)
    l3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    l2 = 3.0 * q - l1 - l3
    return np.stack([l1, l2, l3], axis=-1)


def tidal_eigenvalues(
    delta: np.ndarray,
    box_size: float | Sequence[float],
    smoothing: float,
    workers: int | None = None,
) -> np.ndarray:
    """Eigenvalues of the tidal tensor of the Gaussian-smoothed overdensity.

    Parameters
    ----------
    delta
        Overdensity on a periodic 3-D grid (see :func:`tidal_tensor`).
    box_size
        Side length of the box, one value or one per axis (e.g. Mpc).
    smoothing
        Gaussian smoothing radius, same unit as ``box_size``.
    workers
        Threads for scipy.fft.

    Returns
    -------
    np.ndarray
        float32 array of shape ``(*delta.shape, 3)`` with ``lambda1 >= lambda2 >= lambda3``
        in each cell; their sum is the smoothed overdensity minus its grid mean.
    """
    tensor = tidal_tensor(delta, box_size, smoothing, workers=workers)
    flat = tensor.reshape(6, -1)
    n = flat.shape[1]
    out = np.empty((n, 3), dtype=np.float32)
    for start in range(0, n, _BLOCK):
        sl = slice(start, min(start + _BLOCK, n))
        out[sl] = symmetric_eigenvalues(*(flat[c, sl] for c in range(6)))
    del tensor, flat
    return out.reshape(*delta.shape, 3)


def classify_tweb(eigenvalues: np.ndarray, lambda_th: float | Sequence[float]) -> np.ndarray:
    """T-web class: the number of eigenvalues above ``lambda_th``.

    Parameters
    ----------
    eigenvalues
        Array ``(..., 3)`` (any order); NaN marks a masked cell.
    lambda_th
        Threshold on the eigenvalues (dimensionless, same normalisation as
        :func:`tidal_eigenvalues`): one number (the classic T-web), or three
        non-decreasing numbers ``(t1, t2, t3)`` for the eigenvalues sorted
        ``lambda1 >= lambda2 >= lambda3`` (class = [lambda1 > t1] + [lambda2 > t2]
        + [lambda3 > t3]; see ``WebOptions.lambda_th``).

    Returns
    -------
    np.ndarray
        int8 array of shape ``eigenvalues.shape[:-1]``: 0 Void, 1 Sheet, 2 Filament,
        3 Knot, and :data:`MASKED_CODE` (-1) where any eigenvalue is NaN.
    """
    ev = np.asarray(eigenvalues)
    if ev.shape[-1:] != (3,):
        raise ValueError(f"eigenvalues must have a last axis of length 3, got shape {ev.shape}")
    th = np.atleast_1d(np.asarray(lambda_th, dtype=np.float64))
    if th.shape == (1,):
        code = (ev > th[0]).sum(axis=-1).astype(np.int8)
    elif th.shape == (3,) and np.all(np.diff(th) >= 0):
        code = (-np.sort(-ev, axis=-1) > th).sum(axis=-1).astype(np.int8)  # sorted descending
    else:
        raise ValueError(f"lambda_th must be one number or three non-decreasing numbers, got {lambda_th!r}")
    code[np.isnan(ev).any(axis=-1)] = MASKED_CODE
    return code


def web_class_names(codes: np.ndarray) -> np.ndarray:
    """Class labels (``Void`` ... ``Knot``) for codes; masked codes give ``None``."""
    names = np.array([*WEB_CLASS_NAMES, None], dtype=object)
    codes = np.asarray(codes)
    return names[np.where(codes >= 0, codes, len(WEB_CLASS_NAMES))]


def confusion_matrix(truth: np.ndarray, got: np.ndarray) -> np.ndarray:
    """(4, 4) counts, rows the true class and columns the assigned one; masked (< 0) codes on either side are left out."""
    truth, got = np.asarray(truth), np.asarray(got)
    ok = (got >= 0) & (truth >= 0)
    cm = np.zeros((len(WEB_CLASS_NAMES),) * 2, int)
    np.add.at(cm, (truth[ok], got[ok]), 1)
    return cm


# ================================================================ survey fields on a grid
#: Default grid and T-web settings for a galaxy survey (the choice is argued in the
#: docstring of ``build/layers/topology.py`` and measured in bench/RESULTS.md).
DEFAULT_CELL_MPC = 3.0
DEFAULT_SMOOTHING_MPC = 4.0
DEFAULT_LAMBDA_TH = 0.2


def cic_assign(points: np.ndarray, origin: np.ndarray, cell: float, shape: Sequence[int], weights: np.ndarray | None = None) -> np.ndarray:
    """Cloud-in-cell counts of ``points`` (n, 3) on a grid of ``shape`` cells starting at ``origin``.

    Cell ``i`` spans ``origin + [i, i+1) * cell``; mass falling outside the grid is dropped.
    Returns float32 counts (their sum is the number of points when all are well inside).
    """
    shape = tuple(int(s) for s in shape)
    u = (np.asarray(points, dtype=np.float64) - np.asarray(origin, float)[None, :]) / cell - 0.5
    i0 = np.floor(u).astype(np.int64)
    frac = u - i0
    del u
    grid = np.zeros(int(np.prod(shape)), dtype=np.float64)
    w_base = np.ones(len(frac)) if weights is None else np.asarray(weights, float)
    for corner in product((0, 1), repeat=3):
        idx = i0 + np.asarray(corner)[None, :]
        w = w_base.copy()
        for ax in range(3):
            w *= frac[:, ax] if corner[ax] else 1.0 - frac[:, ax]
        inside = np.all((idx >= 0) & (idx < np.asarray(shape)[None, :]), axis=1)
        flat = np.ravel_multi_index(tuple(idx[inside].T), shape)
        grid += np.bincount(flat, weights=w[inside], minlength=grid.size)
    return grid.reshape(shape).astype(np.float32)


def gaussian_smooth(grid: np.ndarray, cell: float, smoothing: float, workers: int | None = None) -> np.ndarray:
    """Gaussian smoothing (radius ``smoothing``, same unit as ``cell``) by FFT on a periodic grid."""
    if smoothing <= 0:
        return np.asarray(grid, dtype=np.float32)
    lengths = np.asarray(grid.shape, float) * cell
    k = _wavenumbers(grid.shape, lengths)
    gk = sfft.rfftn(np.asarray(grid, dtype=np.float32), workers=workers)
    gk *= np.exp(-0.5 * (k[0] ** 2 + k[1] ** 2 + k[2] ** 2) * np.float32(smoothing) ** 2)
    return sfft.irfftn(gk, s=grid.shape, workers=workers).astype(np.float32)


@dataclass(frozen=True)
class SubVolume:
    """One sub-volume of a domain decomposition, in integer cells of the global grid."""

    core_lo: tuple[int, int, int]
    core_hi: tuple[int, int, int]
    lo: tuple[int, int, int]
    """First cell of the extended (core + buffer) box."""
    hi: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Cells per axis of the extended box."""
        return tuple(h - l for l, h in zip(self.lo, self.hi))  # type: ignore[return-value]

    def in_core(self, cells: np.ndarray) -> np.ndarray:
        """True for global cell indices ``(n, 3)`` inside this sub-volume's core."""
        return np.all((cells >= np.asarray(self.core_lo)) & (cells < np.asarray(self.core_hi)), axis=1)


def decompose(n_cells: Sequence[int], core_cells: int, buffer_cells: int) -> list[SubVolume]:
    """Tile a grid of ``n_cells`` into cores of at most ``core_cells`` per side, each
    extended by ``buffer_cells`` on every side (the buffer may reach past the grid).
    The cores partition the grid, so every cell belongs to exactly one core."""
    if core_cells < 1 or buffer_cells < 0:
        raise ValueError(f"core_cells must be >= 1 and buffer_cells >= 0, got {core_cells}, {buffer_cells}")
    edges = []
    for n in n_cells:
        parts = max(1, int(np.ceil(n / core_cells)))
        edges.append(np.linspace(0, n, parts + 1).round().astype(int))
    subs = []
    for i, j, k in product(*(range(len(e) - 1) for e in edges)):
        clo = (int(edges[0][i]), int(edges[1][j]), int(edges[2][k]))
        chi = (int(edges[0][i + 1]), int(edges[1][j + 1]), int(edges[2][k + 1]))
        subs.append(SubVolume(clo, chi, tuple(c - buffer_cells for c in clo), tuple(c + buffer_cells for c in chi)))  # type: ignore[arg-type]
    return subs


@dataclass
class WebOptions:
    """Settings of the survey T-web and skeleton; every field is a layer option of ``topology``."""

    cell: float = DEFAULT_CELL_MPC
    """Grid cell size, comoving Mpc."""
    smoothing: float = DEFAULT_SMOOTHING_MPC
    """Gaussian smoothing radius of the galaxy and random fields, comoving Mpc."""
    lambda_th: float | tuple[float, float, float] = DEFAULT_LAMBDA_TH
    """T-web eigenvalue threshold (Forero-Romero et al. 2009), or three non-decreasing ones for
    the sorted eigenvalues. On the mock, thresholds fitted to the truth buy overall accuracy
    only by trading the rare classes' completeness: (0.1, 0.3, 0.55) 0.629 -> 0.675 with void
    and knot recall 0.69 -> 0.49 and 0.68 -> 0.48; (0.2, 0.3, 0.35) 0.654 with the class-mean
    recall kept (bench/RESULTS.md, "Thresholds per eigenvalue"). The default stays the truth's 0.2."""
    completeness_min: float = 0.5
    """Cells whose smoothed random density is below this fraction of the full-sky
    expectation at their distance are outside the footprint: masked, not voids."""
    nsigma: float = 3.0
    """Persistence cut of the skeleton, in Poisson sigma."""
    core_cells: int = 224
    """Cells per side of a sub-volume's core (sets peak memory: ~2 GB at 224 + buffers)."""
    buffer: float | None = None
    """Buffer width around each core, Mpc; default max(5 x smoothing, 16 cells), so that
    the long-range tide's coarse grid (cell = buffer / 8) is at least 2 fine cells."""
    workers: int = 1
    """Threads for FFTs and KD-tree queries."""
    subsample: int = 2
    """Points per cell and axis where the selection function is averaged."""

    @classmethod
    def from_dict(cls, options: dict | None) -> WebOptions:
        """Build from a dict, rejecting unknown keys with a suggestion."""
        import difflib
        from dataclasses import fields

        names = [f.name for f in fields(cls)]
        for key in options or {}:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                raise ValueError(f"unknown topology option {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else f"; known: {names}"))
        opts = cls(**(options or {}))
        if isinstance(opts.lambda_th, list):  # from JSON (--set topology.lambda_th=[0.1,0.3,0.55])
            opts.lambda_th = tuple(opts.lambda_th)
        classify_tweb(np.zeros((1, 3)), opts.lambda_th)  # a bad threshold fails here, before any work
        return opts

    @property
    def buffer_cells(self) -> int:
        """Buffer width in cells."""
        width = max(5.0 * self.smoothing, 16 * self.cell) if self.buffer is None else self.buffer
        return int(np.ceil(width / self.cell))


@dataclass
class SurveyWeb:
    """T-web classes at galaxy positions and the stitched filament skeleton."""

    codes: np.ndarray
    """(n,) int8 class codes at the query points; -1 masked (outside the footprint)."""
    eigenvalues: np.ndarray
    """(n, 3) float32 tidal eigenvalues at the query points (NaN when masked)."""
    delta: np.ndarray
    """(n,) float32 smoothed overdensity at the query points (NaN when masked)."""
    seg_start: np.ndarray
    """(m, 3) segment start points, Mpc (same frame as the inputs)."""
    seg_end: np.ndarray
    """(m, 3) segment end points, Mpc."""
    persistence: np.ndarray
    """(m,) significance, in sigma, of the persistence pair that keeps each segment."""
    n_subvolumes: int
    subvolume_shape: tuple[int, int, int]
    """Largest extended sub-volume grid: what sets the peak memory."""


def skeleton_noise(field: np.ndarray, expected: np.ndarray, cell: float, smoothing: float) -> np.ndarray:
    """Poisson noise per cell of a smoothed density ``field`` (1 + delta) built from ``expected`` tracers per cell.

    A Gaussian kernel of ``smoothing`` averages over (2 sqrt(pi) R / cell)^3 cells, so
    the noise of 1 + delta is sqrt((1 + delta) / (expected x that count)): the unit
    in which the skeleton's persistence pairs are cut (``nsigma``).
    """
    n_eff = (2.0 * np.sqrt(np.pi) * smoothing / cell) ** 3 if smoothing > 0 else 1.0
    return np.sqrt(np.maximum(field, 1e-3) / np.maximum(expected * n_eff, 1e-12))


def _radial_density(random_points: np.ndarray, sky_fraction: float, cell: float):
    """Random number density (Mpc^-3) a full footprint would have, as a function of radius."""
    r = np.linalg.norm(random_points, axis=1)
    edges = np.arange(0.0, r.max() + 2 * cell, cell)
    counts, _ = np.histogram(r, bins=edges)
    shell = 4.0 / 3.0 * np.pi * np.diff(edges**3) * sky_fraction
    centres = 0.5 * (edges[1:] + edges[:-1])
    return lambda x: np.interp(x, centres, counts / shell, left=0.0, right=0.0)


class _RandomsExpectation:
    """Expected tracer counts per cell from a random catalogue (``alpha`` x CIC of the randoms)."""

    def __init__(self, randoms: np.ndarray, n_tracers: int, sky_fraction: float, cell: float):
        self.randoms = randoms
        self.alpha = n_tracers / len(randoms)
        self._n_r = _radial_density(randoms, sky_fraction, cell)

    def counts(self, origin: np.ndarray, cell: float, shape: Sequence[int]) -> np.ndarray:
        hi = origin + np.asarray(shape) * cell
        sel = np.all((self.randoms >= origin - cell) & (self.randoms <= hi + cell), axis=1)
        return self.alpha * cic_assign(self.randoms[sel], origin, cell, shape)

    def full(self, radius: np.ndarray) -> np.ndarray:
        return self.alpha * self._n_r(radius)


class _SelectionExpectation:
    """Expected tracer counts per cell from a selection function (``density.SurveySelection``),
    averaged over ``subsample^3`` points per cell: noise-free, no randoms."""

    def __init__(self, selection, subsample: int = 2):
        self.selection = selection
        self.subsample = max(1, int(subsample))

    def counts(self, origin: np.ndarray, cell: float, shape: Sequence[int]) -> np.ndarray:
        s = self.subsample
        sub = (np.arange(s) + 0.5) / s
        out = np.zeros(tuple(shape), np.float32)
        r_lo, r_hi = self.selection.edges[0], self.selection.edges[-1]
        half_diag = 0.87 * cell
        ys = origin[1] + np.arange(shape[1]) * cell
        zs = origin[2] + np.arange(shape[2]) * cell
        for i in range(shape[0]):
            x0 = origin[0] + i * cell
            # skip planes that cannot reach the shell
            cx, cy, cz = x0 + 0.5 * cell, ys + 0.5 * cell, zs + 0.5 * cell
            rc = np.sqrt(cx**2 + cy[:, None] ** 2 + cz[None, :] ** 2)
            near = (rc >= r_lo - half_diag) & (rc <= r_hi + half_diag)
            if not near.any():
                continue
            jj, kk = np.nonzero(near)
            acc = np.zeros(jj.size)
            for a, b, c in product(sub, sub, sub):
                pts = np.stack([np.full(jj.size, x0 + a * cell), ys[jj] + b * cell, zs[kk] + c * cell], axis=-1)
                acc += self.selection.density(pts)
            out[i, jj, kk] = acc * (cell**3 / s**3)
        return out

    def full(self, radius: np.ndarray) -> np.ndarray:
        return self.selection.radial(radius)


def _density_contrast(tracers, expectation, origin, cell, shape, smoothing, completeness_min, workers):
    """Smoothed overdensity on one grid; returns ``(delta, valid, expected)`` (delta = 0 where masked)."""
    d_s = gaussian_smooth(cic_assign(tracers, origin, cell, shape), cell, smoothing, workers)
    expected = gaussian_smooth(expectation.counts(origin, cell, shape), cell, smoothing, workers)
    axes = [origin[a] + (np.arange(shape[a]) + 0.5) * cell for a in range(3)]
    radius = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
    full = expectation.full(radius) * cell**3
    del radius
    valid = (full > 0) & (expected >= completeness_min * full) & (expected > 0)
    del full
    delta = np.zeros(shape, np.float32)
    np.divide(d_s, expected, out=delta, where=valid)
    delta[valid] -= 1.0
    return delta, valid, expected


def _long_range_tide(tracers, expectation, points, fine_origin, fine_hi, options, split):
    """Tidal tensor smoothed by ``split`` on a coarse survey-wide grid, at ``points`` (6, n).

    The coarse cell is an integer multiple of the fine one and the grids are
    aligned, so with a multiple of 1 the long-range part is exactly that of a
    single-volume run.
    """
    from scipy.ndimage import map_coordinates

    coarse = options.cell * max(1, int(split / 2.0 / options.cell))
    pad = np.ceil(4.0 * split / coarse) * coarse  # keeps the periodic images' tides away
    origin = fine_origin - pad
    shape = tuple(int(v) for v in np.ceil((fine_hi + pad - origin) / coarse))
    delta, _, _ = _density_contrast(
        tracers, expectation, origin, coarse, shape, max(options.smoothing, coarse / 2.0),
        options.completeness_min, options.workers,
    )
    if coarse > options.cell:
        # exchange the coarse CIC window for the fine one, as the single-volume run has it
        lengths = np.asarray(shape) * coarse
        k = _wavenumbers(shape, lengths)
        ratio = np.ones((1, 1, 1), np.float32)
        for a in range(3):
            ratio = ratio * (np.sinc(k[a] * options.cell / (2 * np.pi)) / np.sinc(k[a] * coarse / (2 * np.pi))) ** 2
        dk = sfft.rfftn(delta, workers=options.workers) * ratio.astype(np.float32)
        delta = sfft.irfftn(dk, s=shape, workers=options.workers).astype(np.float32)
    tensor = tidal_tensor(delta, np.asarray(shape) * coarse, split, workers=options.workers)
    coords = ((points - origin) / coarse - 0.5).T
    return np.stack([map_coordinates(tensor[c], coords, order=1, mode="nearest") for c in range(6)])


def survey_web(
    points: np.ndarray,
    tracer_points: np.ndarray,
    random_points: np.ndarray | None = None,
    sky_fraction: float | None = None,
    options: WebOptions | None = None,
    selection: SurveySelection | None = None,
) -> SurveyWeb:
    """T-web classes at ``points`` and the filament skeleton of a survey, by sub-volumes.

    Parameters
    ----------
    points
        (n, 3) comoving positions (Mpc, observer at the origin) where the class is wanted.
    tracer_points
        (n_t, 3) positions of the density-defining population (the density field).
    random_points
        (n_r, 3) randoms with the survey's footprint and radial selection; or None
        when ``selection`` is given.
    sky_fraction
        Footprint area / full sky, for the expected random density (randoms only).
    options
        Grid, smoothing, threshold and decomposition settings.
    selection
        A ``density.SurveySelection`` (expected tracer density ``n(r) x footprint``):
        the noise-free alternative to randoms, and what the layer uses.

    Each sub-volume (core + buffer) is processed alone; classes of points and
    skeleton segments starting in its core are kept. The tide is non-local
    (a 1/r^3 tail), so when there is more than one sub-volume it is split as in
    TreePM codes: the part smoothed on ``L = buffer / 4`` comes from a coarse
    survey-wide grid (cell ``L / 2``, 1/8 or fewer of the fine cells), the
    short-range rest, negligible beyond ~4 L, from the sub-volume.
    """
    from ard_sql.science.skeleton import filament_skeleton

    opt = options or WebOptions()
    cell, R = float(opt.cell), float(opt.smoothing)
    points = np.asarray(points, float)
    tracer_points = np.asarray(tracer_points, float)
    if len(tracer_points) == 0:
        raise ValueError("survey_web needs tracers (got zero)")
    if selection is not None:
        expectation = _SelectionExpectation(selection, opt.subsample)
        bound_sets = [tracer_points]
    else:
        if random_points is None or len(random_points) == 0 or sky_fraction is None:
            raise ValueError("survey_web needs randoms and their sky fraction, or a selection function")
        random_points = np.asarray(random_points, float)
        expectation = _RandomsExpectation(random_points, len(tracer_points), sky_fraction, cell)
        bound_sets = [tracer_points, random_points]
    finite = np.all(np.isfinite(points), axis=1)
    if finite.any():
        bound_sets.append(points[finite])
    lo_all = np.min([b.min(axis=0) for b in bound_sets], axis=0)
    hi_all = np.max([b.max(axis=0) for b in bound_sets], axis=0)
    origin = lo_all - cell
    n_cells = np.ceil((hi_all + cell - origin) / cell).astype(int)
    subs = decompose(n_cells, opt.core_cells, opt.buffer_cells)
    split = opt.buffer_cells * cell / 4.0 if len(subs) > 1 else 0.0
    safe_points = np.where(finite[:, None], points, origin)
    # the long-range tide is wanted where the short-range one is read: at the points' cell centres
    centres = origin + (np.floor((safe_points - origin) / cell) + 0.5) * cell
    long_tide = (
        _long_range_tide(tracer_points, expectation, centres, origin, origin + n_cells * cell, opt, split)
        if split > 0
        else None
    )

    def cells_of(p):
        return np.floor((p - origin) / cell).astype(np.int32)

    t_cells = cells_of(tracer_points)
    p_cells = np.where(finite[:, None], cells_of(safe_points), -(2**30))
    n = len(points)
    codes = np.full(n, MASKED_CODE, np.int8)
    eig = np.full((n, 3), np.nan, np.float32)
    dlt = np.full(n, np.nan, np.float32)
    seg_a, seg_b, seg_p = [], [], []
    biggest = (0, 0, 0)
    for sv in subs:
        lo, hi = np.asarray(sv.lo), np.asarray(sv.hi)
        shape = sv.shape
        ext_origin = origin + lo * cell
        sel_t = np.all((t_cells >= lo - 1) & (t_cells <= hi), axis=1)
        mine = np.flatnonzero(sv.in_core(p_cells))
        core_has_tracers = bool(np.any(sv.in_core(t_cells[sel_t]))) if sel_t.any() else False
        if not mine.size and not core_has_tracers:
            continue  # nothing to classify and no skeleton to find here
        biggest = max(biggest, shape, key=lambda s: int(np.prod(s)))
        delta, valid, expected = _density_contrast(
            tracer_points[sel_t], expectation, ext_origin, cell, shape, R, opt.completeness_min, opt.workers,
        )
        if not valid.any():
            continue
        if mine.size:
            tensor = tidal_tensor(delta, np.asarray(shape) * cell, 0.0, workers=opt.workers, short_range=split)
            flat = np.ravel_multi_index(tuple((p_cells[mine] - lo).T), shape)
            comps = [tensor[c].ravel()[flat].astype(np.float64) for c in range(6)]
            del tensor
            if long_tide is not None:
                comps = [comp + long_tide[c, mine] for c, comp in enumerate(comps)]
            ev = symmetric_eigenvalues(*comps).astype(np.float32)
            ok = valid.ravel()[flat]
            ev[~ok] = np.nan
            eig[mine] = ev
            codes[mine] = classify_tweb(ev, opt.lambda_th)
            dlt[mine] = np.where(ok, delta.ravel()[flat], np.nan)
        field = np.where(valid, 1.0 + delta, np.nan).astype(np.float32)
        sigma = skeleton_noise(field, expected, cell, R)
        del expected, delta
        sk = filament_skeleton(field, sigma, opt.nsigma)
        del field, sigma
        if sk.start.size:
            a_ijk = np.stack(np.unravel_index(sk.start, shape), axis=-1) + lo
            b_ijk = np.stack(np.unravel_index(sk.end, shape), axis=-1) + lo
            keep = sv.in_core(a_ijk)
            seg_a.append(origin + (a_ijk[keep] + 0.5) * cell)
            seg_b.append(origin + (b_ijk[keep] + 0.5) * cell)
            seg_p.append(sk.persistence[keep])
    cat = lambda xs, d: np.concatenate(xs) if xs else np.empty((0, 3) if d else (0,))  # noqa: E731
    return SurveyWeb(codes, eig, dlt, cat(seg_a, 1), cat(seg_b, 1), cat(seg_p, 0), len(subs), biggest)

