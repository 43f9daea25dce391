"""Noise-free galaxy spectra from SSPs, then a DESI-like instrument and noise.

Steps for a batch of n galaxies (all vectorised, float32 where it matters):

1. ``rest_continuum``: SSP weights @ templates on the rest log-lambda grid
   (BC03 MILES, intrinsic 2.51 A FWHM), Calzetti dust (one A_V for all ages;
   the Bagpipes layer's model also dims stars younger than 10 Myr by its
   eta = 1/0.44, the mock does not: a small part of its model mismatch),
   Gaussian velocity dispersion applied in Fourier space (one FFT for the
   batch, per-galaxy sigma). The library's own 2.51 A count as part of the
   dispersion (``kinematic_broadening``): a real galaxy has no library
   resolution, so a spectrum broadened by the full SIGMA_STAR on top of it would
   show sqrt(SIGMA_STAR^2 + 64^2) km/s at 5000 A (+7% at 150 km/s in a pPXF fit).
2. ``observe``: redshift, luminosity distance (bagpipes' cosmology) ->
   1e-17 erg/s/cm2/A on the DESI brz grid (linear interpolation in ln lambda
   of a 30 km/s sampled model).
3. ``add_emission_lines``: Gaussians integrated over each 0.8 A pixel (erf),
   observed-frame fluxes in 1e-17 erg/s/cm2, gas sigma in km/s.
4. ``apply_resolution``: the per-arm DESI-like resolution matrices (11
   diagonals, Gaussian LSF with R(lambda) per arm) that the coadd's
   RESOLUTION HDUs carry, so ``flux = R . model`` as in DESI coadds.
5. ``add_noise``: sky continuum + OH lines + object shot noise + read noise
   for BGS (bright) or LRG/QSO (dark) exposures; ivar; a few cosmic-ray
   pixels masked (ivar = 0, mask bit set).

Spectra are aperture-corrected to total flux (what Bagpipes fits expect);
the fiber loss enters only the noise.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy.special import erf

from ard_sql import grid
from ard_sql.science.templates import MILES_FWHM

from .ssp import C_KMS, LOG_DLAM, MOCK_COSMO, SSPLibrary, calzetti_k, ssp_library

L_SUN_ERG_S = 3.826e33  # bagpipes' value
MPC_CM = 3.086e24  # bagpipes' value
#: Emission lines (vacuum Angstrom); names match ard_sql.contract.PPXF_LINES.
LINE_WAVES: dict[str, float] = {
    "OII_3726": 3727.092, "OII_3729": 3729.875, "Hdelta": 4102.892, "Hgamma": 4341.684,
    "Hbeta": 4862.683, "OIII_4959": 4960.295, "OIII_5007": 5008.240, "NII_6548": 6549.86,
    "Halpha": 6564.61, "NII_6584": 6585.27, "SII_6716": 6718.29, "SII_6731": 6732.67,
}
LINE_NAMES = list(LINE_WAVES)
NDIAG = 11
#: DESI-like resolving power at the ends of each arm (instrument paper, Fig. 33), linear in between.
ARM_R_RANGE: dict[str, tuple[float, float]] = {"B": (2000.0, 3200.0), "R": (3200.0, 4100.0), "Z": (4100.0, 5100.0)}
#: Mask bit used for cosmic-ray pixels (desispec.maskbits.specmask COSMIC).
MASK_COSMIC = 1 << 2


# ---------------------------------------------------------------- continuum
#: Velocity sigma (km/s) of the library's own 2.51 A FWHM at 5000 A rest, where SIGMA_STAR holds exactly.
SIGMA_LIBRARY_KMS = C_KMS * MILES_FWHM / 2.3548 / 5000.0


def kinematic_broadening(sigma_kms: np.ndarray) -> np.ndarray:
    """The velocity sigma applied to the library so that a spectrum shows ``sigma_kms``.

    sqrt(sigma^2 - sigma_lib^2) with the library's own resolution at 5000 A rest
    (:data:`SIGMA_LIBRARY_KMS`, 64 km/s); 0 below it (such a galaxy is shown at the
    library's resolution: broader than its SIGMA_STAR). Constant in velocity, so
    the spectrum's dispersion is SIGMA_STAR at 5000 A and sqrt(SIGMA_STAR^2 +
    sigma_lib(lambda)^2 - 64^2) elsewhere (+-4% at 150 km/s between 4000 and 6500 A).
    """
    return np.sqrt(np.clip(np.asarray(sigma_kms, dtype=np.float64) ** 2 - SIGMA_LIBRARY_KMS**2, 0.0, None))


def rest_continuum(weights: np.ndarray, av: np.ndarray, sigma_kms: np.ndarray, lib: SSPLibrary | None = None) -> np.ndarray:
    """(n, nlog) float32 rest-frame L_sun/A: SSP sum, Calzetti dust, velocity dispersion.

    Args:
        weights: (n, nZ*nage) M_sun formed per SSP (``ssp.star_formation_histories``).
        av: (n,) Calzetti V-band attenuation, mag.
        sigma_kms: (n,) stellar velocity dispersion, the library's own resolution
            included (:func:`kinematic_broadening`).
    """
    lib = lib or ssp_library()
    spec = weights.astype(np.float32) @ lib.templates
    trans = 10.0 ** (-0.4 * np.asarray(av, dtype=np.float32)[:, None] * calzetti_k(lib.wave).astype(np.float32)[None, :])
    spec *= trans
    return broaden(spec, kinematic_broadening(sigma_kms))


def broaden(spec: np.ndarray, sigma_kms: np.ndarray) -> np.ndarray:
    """Gaussian broadening in velocity of spectra on the log-lambda grid, one sigma per row (FFT).

    Single-precision FFTs (scipy.fft) of a 5-smooth length: the kernel is applied
    exactly in Fourier space, so the result equals a direct Gaussian convolution
    to float32 rounding, at about a third of the cost of numpy's double FFT.
    """
    n, npix = spec.shape
    pad = 512  # keeps wrap-around away from the used range (> 6 sigma at 1000 km/s)
    nfft = sfft.next_fast_len(npix + 2 * pad, real=True)
    padded = np.empty((n, nfft), dtype=np.float32)
    padded[:, pad : pad + npix] = spec
    padded[:, :pad] = spec[:, :1]
    padded[:, pad + npix :] = spec[:, -1:]
    ft = sfft.rfft(padded, axis=1)
    k = np.fft.rfftfreq(nfft)
    sig_pix = np.asarray(sigma_kms, dtype=np.float64) / (C_KMS * LOG_DLAM)
    ft *= np.exp(-2.0 * (np.pi * k[None, :] * sig_pix[:, None]) ** 2).astype(np.float32)
    return np.ascontiguousarray(sfft.irfft(ft, n=nfft, axis=1)[:, pad : pad + npix], dtype=np.float32)


def luminosity_distance_cm(z: np.ndarray) -> np.ndarray:
    """Luminosity distance (cm) in the mock cosmology, through a fine interpolation table."""
    zz = np.linspace(0.0, 4.0, 4001)
    dl = MOCK_COSMO.luminosity_distance(zz).to_value("Mpc")
    return np.interp(np.asarray(z, dtype=np.float64), zz, dl) * MPC_CM


def observe(rest: np.ndarray, z: np.ndarray, wave_obs: np.ndarray, lib: SSPLibrary | None = None) -> np.ndarray:
    """Rest-frame L_sun/A -> observed 1e-17 erg/s/cm2/A on ``wave_obs`` (zero outside the model)."""
    lib = lib or ssp_library()
    z = np.asarray(z, dtype=np.float64)
    scale = L_SUN_ERG_S / (4.0 * np.pi * luminosity_distance_cm(z) ** 2 * (1.0 + z)) / 1e-17
    pos = (np.log(wave_obs)[None, :] - np.log1p(z)[:, None] - lib.log_wave[0]) / LOG_DLAM
    i0 = np.floor(pos).astype(np.int64)
    inside = (i0 >= 0) & (i0 < lib.log_wave.size - 1)
    i0 = np.clip(i0, 0, lib.log_wave.size - 2)
    frac = (pos - i0).astype(np.float32)
    lo = np.take_along_axis(rest, i0, axis=1)
    hi = np.take_along_axis(rest, i0 + 1, axis=1)
    out = (lo * (1.0 - frac) + hi * frac) * scale[:, None].astype(np.float32)
    return np.where(inside, out, 0.0).astype(np.float32)


# ---------------------------------------------------------------- emission lines
def add_emission_lines(
    flux: np.ndarray, wave_obs: np.ndarray, z: np.ndarray, line_flux: np.ndarray, sigma_gas_kms: np.ndarray,
    line_waves: np.ndarray | None = None,
) -> np.ndarray:
    """Add Gaussian lines integrated over each pixel (in place; returns ``flux``).

    Args:
        flux: (n, npix) spectra on the uniform grid ``wave_obs``.
        line_flux: (n, nlines) observed fluxes, 1e-17 erg/s/cm2 (default lines: ``LINE_NAMES``).
        sigma_gas_kms: (n,) or (n, nlines) intrinsic Gaussian sigma.
    """
    lw = np.asarray(list(LINE_WAVES.values()) if line_waves is None else line_waves)
    dw = wave_obs[1] - wave_obs[0]
    center = lw[None, :] * (1.0 + np.asarray(z))[:, None]  # (n, L)
    sig = np.broadcast_to(np.asarray(sigma_gas_kms, dtype=np.float64).reshape(len(z), -1), center.shape)
    sig_a = np.maximum(center * sig / C_KMS, 0.05)
    half = int(np.ceil(6 * sig_a.max() / dw)) + 1
    offs = np.arange(-half, half + 1)
    ic = np.rint((center - wave_obs[0]) / dw).astype(np.int64)
    idx = ic[:, :, None] + offs[None, None, :]  # (n, L, K)
    lo = wave_obs[0] + (idx - 0.5) * dw
    hi = lo + dw
    s2 = np.sqrt(2.0) * sig_a[:, :, None]
    prof = 0.5 * (erf((hi - center[:, :, None]) / s2) - erf((lo - center[:, :, None]) / s2)) / dw
    vals = (prof * np.asarray(line_flux)[:, :, None]).astype(np.float32)
    ok = (idx >= 0) & (idx < wave_obs.size)
    rows = np.broadcast_to(np.arange(len(z))[:, None, None], idx.shape)
    np.add.at(flux, (rows[ok], idx[ok]), vals[ok])
    return flux


# ---------------------------------------------------------------- instrument
def arm_resolving_power(arm: str, wave: np.ndarray) -> np.ndarray:
    """DESI-like resolving power R(lambda) of one arm, linear between the arm's ends."""
    lo, hi = grid.ARMS[arm]
    r0, r1 = ARM_R_RANGE[arm]
    return r0 + (r1 - r0) * (wave - lo) / (hi - lo)


def resolution_diagonals(wave: np.ndarray, resolving_power: np.ndarray, ndiag: int = NDIAG) -> np.ndarray:
    """(ndiag, nwave) DESI RESOLUTION data for a Gaussian LSF of sigma = lambda / (2.355 R).

    Follows the data model: ``offsets = ndiag//2 - arange(ndiag)`` and
    ``scipy.sparse.dia_matrix((data, offsets))``, i.e. ``R[i, j] = data[d, j]`` with
    ``j - i = offsets[d]``; every row of R sums to one.
    """
    dw = np.gradient(wave)
    sig_pix = wave / (2.3548 * resolving_power) / dw
    offsets = ndiag // 2 - np.arange(ndiag)
    nw = wave.size
    rows = np.arange(nw)
    # Kernel of row i evaluated at column i + offset, with the row's own sigma.
    ker = np.exp(-0.5 * (offsets[:, None] / sig_pix[None, :]) ** 2)  # (ndiag, row)
    # Only the columns inside the arm exist: normalise over those, or the first and last few pixels of
    # every arm would lose the kernel's outer part (20-45 % low flux: dips where the arms are combined).
    ker *= ((rows[None, :] + offsets[:, None] >= 0) & (rows[None, :] + offsets[:, None] < nw))
    ker /= ker.sum(axis=0, keepdims=True)
    data = np.zeros((ndiag, nw))
    for d, off in enumerate(offsets):
        cols = rows + off
        ok = (cols >= 0) & (cols < nw)
        data[d, cols[ok]] = ker[d, rows[ok]]
    return data.astype(np.float32)


def apply_resolution(flux: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``R . flux`` for every row of ``flux`` (n, nwave), with one resolution ``data`` (ndiag, nwave)."""
    ndiag, nw = data.shape
    offsets = ndiag // 2 - np.arange(ndiag)
    out = np.zeros_like(flux)
    for d, off in enumerate(offsets):
        # out[i] += data[d, i+off] * flux[i+off]
        if off >= 0:
            out[:, : nw - off] += data[d, off:] * flux[:, off:]
        else:
            out[:, -off:] += data[d, : nw + off] * flux[:, : nw + off]
    return out


# ---------------------------------------------------------------- noise
#: Exposure settings: effective exposure time (s) and sky brightness (AB mag/arcsec^2 in r).
PROGRAMS: dict[str, dict[str, float]] = {
    "bright": {"exptime": 180.0, "sky_mag": 19.7},
    "dark": {"exptime": 1000.0, "sky_mag": 21.1},
}
TELESCOPE_AREA_CM2 = 86_600.0  # Mayall effective collecting area
FIBER_AREA_ARCSEC2 = np.pi * 0.75**2
READ_NOISE_E = 7.0  # effective per wavelength pixel (extraction over ~4 CCD rows, 2-4 exposures)


def throughput(wave: np.ndarray) -> np.ndarray:
    """Smooth DESI-like total throughput (atmosphere + telescope + spectrograph), 0.1 at 3600 A to ~0.5."""
    w = np.asarray(wave, dtype=np.float64)
    t = 0.52 * np.exp(-0.5 * ((w - 6800.0) / 2600.0) ** 2)
    return np.clip(t, 0.05, None)


def _oh_lines(seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """A fixed forest of OH-like sky lines (positions, relative strengths) redward of 5500 A."""
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.uniform(5500.0, 9824.0, 260))
    strength = rng.lognormal(0.0, 1.0, pos.size) * (1.0 + 4.0 * (pos > 7700.0))
    return np.concatenate([pos, [5578.9, 6302.0, 5891.6, 5897.6]]), np.concatenate([strength, [60.0, 20.0, 12.0, 12.0]])


def sky_spectrum(wave: np.ndarray, program: str) -> np.ndarray:
    """Sky flux in one fiber, 1e-17 erg/s/cm2/A: continuum at the program's brightness + OH lines."""
    mag = PROGRAMS[program]["sky_mag"]
    fnu = 10.0 ** (-0.4 * (mag + 48.6))  # per arcsec^2
    cont = fnu * 2.998e18 / wave**2 / 1e-17 * FIBER_AREA_ARCSEC2
    if program == "bright":
        cont = cont * (6200.0 / wave) ** 1.0  # moonlight is blue
    pos, amp = _oh_lines()
    lines = np.zeros_like(wave)
    for p, a in zip(pos, amp):
        near = np.abs(wave - p) < 5.0
        lines[near] += a * np.exp(-0.5 * ((wave[near] - p) / 0.9) ** 2)
    # Median OH line peaks near the continuum level, the strongest tens of times above it.
    return cont + 0.8 * cont.mean() * lines


def electrons_per_flux(wave: np.ndarray, program: str) -> np.ndarray:
    """Detected electrons per pixel per 1e-17 erg/s/cm2/A of flux entering the fiber."""
    dw = np.gradient(wave)
    photon_erg = 6.626e-27 * 2.998e18 / wave
    return throughput(wave) * TELESCOPE_AREA_CM2 * PROGRAMS[program]["exptime"] * dw * 1e-17 / photon_erg


def noise_sigma(model: np.ndarray, wave: np.ndarray, program: str, fiber_frac: np.ndarray) -> np.ndarray:
    """(n, npix) 1-sigma noise in flux units for noise-free ``model`` (total flux) and fiber fractions."""
    conv = electrons_per_flux(wave, program)[None, :]
    sky = sky_spectrum(wave, program)[None, :]
    obj_e = np.clip(model * np.asarray(fiber_frac)[:, None], 0.0, None) * conv
    var_e = obj_e + sky * conv + READ_NOISE_E**2
    # Aperture correction scales the noise with the signal.
    return (np.sqrt(var_e) / conv / np.asarray(fiber_frac)[:, None]).astype(np.float32)


def add_noise(
    model: np.ndarray, wave: np.ndarray, program: str, fiber_frac: np.ndarray, rng: np.random.Generator,
    n_cosmics: float = 3.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy flux, ivar and mask for noise-free ``model`` (n, npix).

    A Poisson number (mean ``n_cosmics``) of cosmic-ray pixels per spectrum get a
    spike, ivar = 0 and the COSMIC mask bit, as DESI coadds flag them.
    """
    sigma = noise_sigma(model, wave, program, fiber_frac)
    flux = model + sigma * rng.standard_normal(model.shape, dtype=np.float32)
    ivar = (1.0 / sigma**2).astype(np.float32)
    mask = np.zeros(model.shape, dtype=np.uint32)
    n = model.shape[0]
    counts = rng.poisson(n_cosmics, n)
    rows = np.repeat(np.arange(n), counts)
    cols = rng.integers(0, model.shape[1], rows.size)
    flux[rows, cols] += (20.0 * sigma[rows, cols] * (1.0 + rng.random(rows.size))).astype(np.float32)
    ivar[rows, cols] = 0.0
    mask[rows, cols] |= MASK_COSMIC
    return flux.astype(np.float32), ivar, mask
