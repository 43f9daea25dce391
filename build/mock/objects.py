"""Stars and QSOs (so target filters matter) and broad-band photometry of every object.

Stars: a blackbody of T_eff with Gaussian absorption lines (Balmer for hot
stars, Ca II H&K, Mg b, Na D for cool ones), radial velocity of tens of km/s.
QSOs: a power law f_nu ~ nu^alpha with broad Lya, CIV, CIII], MgII, Hgamma,
Hbeta, Halpha and narrow [OIII]. Both are scaled to their r magnitude.

Photometry: AB magnitudes in approximate (Gaussian) DECam g, r, z and WISE
W1, W2 passbands; fluxes in nanomaggies.
"""

from __future__ import annotations

import numpy as np

from .spectra import add_emission_lines

#: Approximate passbands: (centre, sigma) in Angstrom.
BANDS: dict[str, tuple[float, float]] = {"G": (4800.0, 500.0), "R": (6400.0, 550.0), "Z": (9200.0, 500.0),
                                          "W1": (33500.0, 2600.0), "W2": (46000.0, 4000.0)}
PHOT_WAVE = np.arange(3000.0, 10600.0, 2.0)  # observed grid for optical synthetic photometry


def ab_mag(wave: np.ndarray, flux: np.ndarray, band: str) -> np.ndarray:
    """AB magnitude of spectra ``flux`` (n, nwave) in 1e-17 erg/s/cm2/A through a Gaussian passband."""
    c, s = BANDS[band]
    t = np.exp(-0.5 * ((wave - c) / s) ** 2)
    num = (flux * t * wave).sum(axis=1) * 1e-17
    den = (t * 2.998e18 / wave).sum()
    fnu = num / den
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(fnu > 0, -2.5 * np.log10(fnu) - 48.6, np.inf)


def mag_to_nanomaggy(mag: np.ndarray) -> np.ndarray:
    """AB magnitude -> nanomaggies (22.5 zero point)."""
    return 10.0 ** (-0.4 * (np.asarray(mag) - 22.5))


def star_spectra(wave: np.ndarray, teff: np.ndarray, rmag: np.ndarray, v_kms: np.ndarray) -> np.ndarray:
    """(n, nwave) noise-free star spectra in 1e-17 erg/s/cm2/A."""
    lam_cm = wave[None, :] * 1e-8
    x = 1.4388 / (lam_cm * teff[:, None])
    bb = 1.0 / (lam_cm**5 * np.expm1(np.minimum(x, 700.0)))
    z = v_kms / 299792.458
    hot = np.clip((teff - 5000.0) / 3000.0, 0.0, 1.0)[:, None]
    cool = 1.0 - hot
    depth = np.zeros_like(bb)
    for lam, d_hot, d_cool, w in ((3934.8, 0.1, 0.6, 6), (3969.6, 0.1, 0.5, 6), (4102.9, 0.5, 0.1, 12), (4341.7, 0.5, 0.1, 12),
                                  (4862.7, 0.5, 0.15, 12), (6564.6, 0.4, 0.15, 10), (5176.7, 0.05, 0.3, 8), (5895.0, 0.05, 0.35, 5)):
        prof = np.exp(-0.5 * ((wave[None, :] - lam * (1 + z[:, None])) / w) ** 2)
        depth += (d_hot * hot + d_cool * cool) * prof
    spec = bb * np.clip(1.0 - depth, 0.05, 1.0)
    return _scale_to_r(wave, spec, rmag)


def qso_spectra(wave: np.ndarray, z: np.ndarray, alpha: np.ndarray, line_scale: np.ndarray, rmag: np.ndarray) -> np.ndarray:
    """(n, nwave) noise-free QSO spectra in 1e-17 erg/s/cm2/A."""
    cont = (wave[None, :] / 5000.0) ** (-2.0 - alpha[:, None])  # f_lambda for f_nu ~ nu^alpha
    lines = np.array([1215.7, 1549.1, 1908.7, 2798.8, 4341.7, 4862.7, 5008.2, 6564.6])
    ew = np.array([90.0, 40.0, 20.0, 35.0, 10.0, 45.0, 12.0, 180.0])  # rest equivalent widths, A
    sig = np.array([2500.0, 2500.0, 2500.0, 2000.0, 1800.0, 1800.0, 250.0, 1800.0])
    flux = cont.astype(np.float32)
    cont_at = (lines[None, :] * (1 + z[:, None]) / 5000.0) ** (-2.0 - alpha[:, None])
    lf = cont_at * ew[None, :] * (1 + z[:, None]) * line_scale[:, None]
    for j in range(lines.size):
        add_emission_lines(flux, wave, z, lf[:, j : j + 1], np.full(z.size, sig[j]), line_waves=lines[j : j + 1])
    # Lyman-alpha forest: mean transmission blueward of Lya.
    forest = wave[None, :] < 1215.7 * (1 + z[:, None])
    flux = np.where(forest, flux * np.exp(-0.0018 * (1 + z[:, None]) ** 3.92), flux)
    return _scale_to_r(wave, flux, rmag)


def _scale_to_r(wave: np.ndarray, spec: np.ndarray, rmag: np.ndarray) -> np.ndarray:
    m0 = ab_mag(wave, spec, "R")
    return (spec * 10.0 ** (-0.4 * (rmag - m0))[:, None]).astype(np.float32)
