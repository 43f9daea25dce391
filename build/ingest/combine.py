"""Put the three DESI arms on one brz grid; S/N and line-spread width (pure numpy).

Arm combination follows desispec's ``coadd_cameras``: in the overlaps
(5760-5800 A, 7520-7620 A) the flux is the inverse-variance weighted mean of
the arms' good pixels, the ivar is their sum, and the mask is the bitwise AND
(a pixel is bad only when every arm covering it is bad). A pixel is *good*
when its mask is 0 and its ivar > 0. Non-finite flux or ivar and negative
ivar are repaired before combining: the pixel gets ivar 0 and the mask bit
:data:`BADVALUE` (they are counted, so the ingest can report them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ard_sql import grid

#: Mask bit the ingest sets on pixels whose flux or ivar was NaN/inf or whose ivar was negative.
#: DESI's own specmask uses bits 0-20; bit 30 is free.
BADVALUE = np.uint32(1 << 30)
#: Mask value of brz pixels that no arm covers (outside every arm's range).
NOCOVERAGE = np.uint32(1 << 31)
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass
class Combined:
    """Spectra on the brz grid."""

    flux: np.ndarray
    """(n, NPIX) float32"""
    ivar: np.ndarray
    """(n, NPIX) float32, 0 on bad pixels"""
    mask: np.ndarray
    """(n, NPIX) uint32"""
    n_repaired: np.ndarray
    """(n,) number of pixels repaired (non-finite flux/ivar, negative ivar) per spectrum."""
    snr_arm: dict[str, np.ndarray]
    """Per arm: (n,) median flux*sqrt(ivar) over the arm's good pixels (NaN when none)."""


def repair(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Zero the ivar (and flux) of non-finite or negative-ivar pixels and flag them; return counts."""
    bad = ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar < 0)
    if not bad.any():
        return flux, ivar, mask, np.zeros(flux.shape[0], dtype=np.int64)
    flux = np.where(bad, 0.0, flux).astype(np.float32)
    ivar = np.where(bad, 0.0, ivar).astype(np.float32)
    mask = mask | np.where(bad, BADVALUE, np.uint32(0))
    return flux, ivar, mask, bad.sum(axis=1)


def median_snr(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median of flux*sqrt(ivar) over good pixels (mask 0, ivar > 0), per row; NaN when none."""
    good = (mask == 0) & (ivar > 0)
    snr = np.where(good, flux * np.sqrt(np.where(good, ivar, 0)), np.nan)
    out = np.full(flux.shape[0], np.nan, dtype=np.float32)
    has = good.any(axis=1)
    if has.any():
        out[has] = np.nanmedian(snr[has], axis=1)
    return out


def combine_arms(arms: dict[str, tuple[slice, np.ndarray, np.ndarray, np.ndarray]], n: int) -> Combined:
    """Combine ``{arm: (brz slice, flux, ivar, mask)}`` of ``n`` spectra onto the brz grid."""
    wsum = np.zeros((n, grid.NPIX), dtype=np.float64)
    fsum = np.zeros((n, grid.NPIX), dtype=np.float64)
    mask = np.full((n, grid.NPIX), NOCOVERAGE, dtype=np.uint32)
    mask_or = np.zeros((n, grid.NPIX), dtype=np.uint32)
    covered = np.zeros(grid.NPIX, dtype=bool)
    repaired = np.zeros(n, dtype=np.int64)
    snr_arm: dict[str, np.ndarray] = {}
    for arm, (index, flux, ivar, amask) in arms.items():
        flux, ivar, amask, nrep = repair(np.asarray(flux, np.float32), np.asarray(ivar, np.float32), np.asarray(amask, np.uint32))
        repaired += nrep
        snr_arm[arm] = median_snr(flux, ivar, amask)
        w = np.where(amask == 0, ivar, 0.0)
        wsum[:, index] += w
        fsum[:, index] += w * flux
        # First arm over a pixel sets its mask; later arms AND into it.
        first = ~covered[index]
        mask[:, index] = np.where(first, amask, mask[:, index] & amask)
        mask_or[:, index] |= amask
        covered[index] = True
    good = wsum > 0
    flux = np.zeros((n, grid.NPIX), dtype=np.float32)
    flux[good] = (fsum[good] / wsum[good]).astype(np.float32)
    # A pixel with some weight is usable: clear the bits of the arms that were bad there.
    mask[good] = 0
    # Every arm bad there but with no bit in common (AND = 0): keep their bits (OR), so the
    # pixel does not read as good.
    lost = ~good & (mask == 0) & (mask_or != 0)
    mask[lost] = mask_or[lost]
    return Combined(flux, wsum.astype(np.float32), mask, repaired, snr_arm)


def resolution_sigma_pixels(resolution_mean: np.ndarray) -> np.ndarray:
    """Gaussian sigma (pixels) of DESI resolution data (ndiag, nwave), per wavelength.

    Diagonal ``d`` has offset ``ndiag//2 - d`` (desispec / scipy ``dia_matrix``
    convention); sigma is the second moment of the kernel about its centroid.
    NaN where the kernel sums to zero.
    """
    r = np.clip(np.asarray(resolution_mean, dtype=np.float64), 0, None)
    ndiag = r.shape[0]
    offsets = (ndiag // 2 - np.arange(ndiag))[:, None].astype(np.float64)
    total = r.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (offsets * r).sum(axis=0) / total
        var = (offsets**2 * r).sum(axis=0) / total - mean**2
    return np.where(total > 0, np.sqrt(np.clip(var, 0, None)), np.nan)


def default_lsf_sigma() -> np.ndarray:
    """Per-arm default LSF sigma (Angstrom) on the brz grid from ``grid.ARM_RESOLUTION``."""
    wave = grid.brz_wavelength()
    sigma = np.zeros(grid.NPIX)
    count = np.zeros(grid.NPIX)
    for arm, r in grid.ARM_RESOLUTION.items():
        idx = grid.arm_slice(arm)
        sigma[idx] += wave[idx] / r / _FWHM_PER_SIGMA
        count[idx] += 1
    return (sigma / np.maximum(count, 1)).astype(np.float32)


def lsf_sigma(per_arm: dict[str, tuple[slice, np.ndarray | None, float]]) -> np.ndarray:
    """Partition LSF sigma (Angstrom) on the brz grid.

    ``per_arm``: ``{arm: (brz slice, mean resolution data (ndiag, nwave) or None, weight)}``,
    the weight being the number of spectra behind the mean. Arms are
    weight-averaged where they overlap; pixels without resolution data get
    the per-arm default.
    """
    num = np.zeros(grid.NPIX)
    den = np.zeros(grid.NPIX)
    for index, res, weight in per_arm.values():
        if res is None or weight <= 0:
            continue
        sig = resolution_sigma_pixels(res) * grid.DWAVE
        ok = np.isfinite(sig) & (sig > 0)
        seg_num = np.where(ok, sig * weight, 0.0)
        num[index] += seg_num
        den[index] += np.where(ok, weight, 0.0)
    out = default_lsf_sigma().astype(np.float64)
    have = den > 0
    out[have] = num[have] / den[have]
    return out.astype(np.float32)
