"""Simulated DESI-like spectra from the Swiss Army model (bagpipes' own forward model).

Used to train the amortized estimator, to test the fits, and as the truth of
the validation set when no mock survey is given. The noise model is
"DESI-like": Gaussian, per pixel sigma = median(flux) / SNR x a smooth
throughput shape (DESI's sensitivity falls at both ends of the brz range), so
the signal-to-noise per native 0.8 A pixel has median ``snr``.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from ard_sql import grid
from ard_sql.science import pipes_model as pm
from ard_sql.science.pipes_env import load_bagpipes
from ard_sql.science.pipes_fit import QUANTITIES


def noise_shape(wave: np.ndarray) -> np.ndarray:
    """Relative noise vs observed wavelength (1 in the middle, ~1.8 at 3600 A, ~1.5 at 9800 A)."""
    wave = np.asarray(wave, float)
    blue = 1.0 + 0.8 * np.exp(-(wave - 3600.0) / 400.0)
    red = 1.0 + 0.5 * np.exp((wave - 9800.0) / 500.0)
    return blue * red


class Simulator:
    """Noiseless model spectra on a fixed observed wavelength grid, one bagpipes model reused."""

    def __init__(self, wave: np.ndarray | None = None) -> None:
        self.pipes = load_bagpipes()
        self.wave = pm.fit_wavelengths() if wave is None else np.asarray(wave, float)
        with contextlib.redirect_stdout(io.StringIO()):
            self._model = self.pipes.model_galaxy(pm.model_components(np.array([10.0, 3.0, 1.0, 1.0, 0.3]), 0.1),
                                                  spec_wavs=self.wave)

    def spectra(self, theta: np.ndarray, z: np.ndarray, veldisp: np.ndarray | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Model fluxes (n, nwave) in 1e-17 erg/s/cm2/A and the true quantities of each row."""
        theta = np.atleast_2d(theta)
        n = len(theta)
        z = np.broadcast_to(np.asarray(z, float), (n,))
        vd = np.full(n, np.nan) if veldisp is None else np.broadcast_to(np.asarray(veldisp, float), (n,))
        flux = np.empty((n, self.wave.size))
        truth = {q: np.empty(n) for q in QUANTITIES}
        for i in range(n):
            self._model.update(pm.model_components(theta[i], z[i], None if np.isnan(vd[i]) else vd[i]))
            flux[i] = self._model.spectrum[:, 1] * 1e17
            sfh = self._model.sfh
            truth["LogMass"][i] = sfh.stellar_mass
            truth["SFR"][i] = sfh.sfr
            truth["sSFR"][i] = sfh.ssfr if np.isfinite(sfh.ssfr) else -np.inf
            truth["Age"][i] = sfh.mass_weighted_age
        truth["Dust_Av"] = theta[:, 4].copy()
        truth["Metallicity"] = theta[:, 3].copy()
        truth["Tau"] = theta[:, 2].copy()
        truth["t_quench"] = pm.t_quench(theta[:, 1], theta[:, 2])
        return flux, truth


def add_noise(flux: np.ndarray, wave: np.ndarray, snr: np.ndarray, rng: np.random.Generator,
              pixels_per_bin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Add DESI-like Gaussian noise; ``snr`` is the median S/N per native 0.8 A pixel.

    ``pixels_per_bin`` > 1 when ``wave`` is a binned grid (noise falls by its square root).
    Returns (noisy flux, ivar).
    """
    flux = np.atleast_2d(flux)
    dtype = np.float32 if flux.dtype == np.float32 else np.float64  # float32 in, float32 out (training sets)
    snr = np.broadcast_to(np.asarray(snr, float), (len(flux),))
    level = (np.median(np.abs(flux), axis=1) / snr / np.sqrt(pixels_per_bin)).astype(dtype)
    sigma = level[:, None] * noise_shape(wave).astype(dtype)[None, :]
    noisy = flux + sigma * rng.standard_normal(flux.shape, dtype=dtype)
    return noisy, 1.0 / sigma**2


def simulate_brz(theta: np.ndarray, z: float, snr: float, rng: np.random.Generator,
                 veldisp: float | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One noisy spectrum on the native brz grid (flux, ivar as float32) and its truth.

    The model is computed on the fits' 8 A bins, exactly as a Bagpipes fit
    computes it (``pipes_model.fit_wavelengths``), and each bin's noisy value
    is spread over its ``FIT_BIN`` native pixels with ivar / FIT_BIN, so that
    ``pipes_model.bin_spectra`` gives back that bin exactly: a fit of this
    spectrum tests the sampler and the likelihood, not a resampling mismatch
    (the mock survey, with its own SSP code, tests that). ``snr`` is the
    median S/N per native pixel.
    """
    sim = Simulator()
    flux, truth = sim.spectra(theta, z, None if veldisp is None else np.array([veldisp]))
    noisy, ivar = add_noise(flux, sim.wave, np.array([snr]), rng, pixels_per_bin=pm.FIT_BIN)
    n = noisy.shape[1] * pm.FIT_BIN
    out_f = np.zeros(grid.NPIX, np.float32)
    out_i = np.zeros(grid.NPIX, np.float32)
    out_f[:n] = np.repeat(noisy[0], pm.FIT_BIN)
    out_i[:n] = np.repeat(ivar[0] / pm.FIT_BIN, pm.FIT_BIN)
    return out_f, out_i, {k: float(v[0]) for k, v in truth.items()}
