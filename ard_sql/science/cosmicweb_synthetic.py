"""Clustered synthetic galaxy catalogues for the topology tests and benchmarks.

A log-normal density field (Coles & Jones 1991) from a Gaussian random field
with a power-law spectrum and a Gaussian cutoff, Poisson-sampled: quick to
draw for 10^7 points, with knots, filaments, sheets and voids whose truth is
the T-web of the generating field. Not a cosmological simulation: the mock
survey (``ard mock``) is where the physics lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft

from ard_sql.science.cosmicweb import _wavenumbers


@dataclass
class LognormalCatalog:
    """Points and the field they were drawn from."""

    points: np.ndarray
    """(n, 3) positions in ``[0, box_size)^3``."""
    density: np.ndarray
    """(grid, grid, grid) mean-normalised density ``1 + delta`` the points sample."""
    box_size: float


def lognormal_catalog(
    n_points: int,
    box_size: float,
    grid: int = 128,
    spectral_index: float = -1.5,
    cutoff: float = 4.0,
    sigma_g: float = 1.2,
    seed: int = 0,
) -> LognormalCatalog:
    """Draw about ``n_points`` points from a log-normal field in a periodic box.

    ``sigma_g`` is the rms of the Gaussian field (contrast), ``cutoff`` the
    Gaussian damping scale of its spectrum (same unit as ``box_size``).
    """
    rng = np.random.default_rng(seed)
    shape = (grid, grid, grid)
    k = _wavenumbers(shape, np.full(3, float(box_size)))
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    k2[0, 0, 0] = 1.0
    amp = k2 ** (spectral_index / 4.0) * np.exp(-0.25 * k2 * cutoff**2)
    amp[0, 0, 0] = 0.0
    white = sfft.rfftn(rng.standard_normal(shape).astype(np.float32))
    g = sfft.irfftn(white * amp, s=shape).astype(np.float64)
    g *= sigma_g / g.std()
    rho = np.exp(g - 0.5 * sigma_g**2)
    rho /= rho.mean()
    cell = box_size / grid
    counts = rng.poisson(rho.ravel() * n_points / rho.size)
    cells = np.repeat(np.arange(rho.size), counts)
    ijk = np.stack(np.unravel_index(cells, shape), axis=-1)
    points = (ijk + rng.random(ijk.shape)) * cell
    return LognormalCatalog(points, rho.astype(np.float32), float(box_size))
