"""One Bagpipes fit of one DESI spectrum with the nautilus sampler.

``fit_galaxy`` bins the spectrum to 8 A (``pipes_model.bin_spectra``), fits
the Swiss Army model (``pipes_model.fit_instructions``) with nautilus chosen
explicitly, and returns a :class:`FitResult`: one row of
``contract.BAGPIPES_COLUMNS`` (p16/p50/p84 of every quantity), 200 posterior
draws, and the best-fit (maximum-likelihood draw) model on the brz grid. A fit
that cannot run or does not converge gives NULL values and a flag bit, never a
default number.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ard_sql import grid
from ard_sql.contract import BAGPIPES_COLUMNS
from ard_sql.science import pipes_model as pm
from ard_sql.science.pipes_env import load_bagpipes, pipes_workdir

#: ``Bagpipes_flag`` bits (shared with the amortized estimator).
FLAGS: dict[str, int] = {
    "NO_DATA": 1,          # fewer than MIN_GOOD_BINS usable 8 A bins (e.g. all ivar zero)
    "BAD_REDSHIFT": 2,     # Z missing, <= 0 or above bagpipes' max_redshift
    "FIT_FAILED": 4,       # the sampler or the model raised
    "NOT_CONVERGED": 8,    # effective sample size below MIN_N_EFF
    "AT_PRIOR_EDGE": 16,   # median mass formed within 0.05 dex of its prior bound (values kept)
    "OUT_OF_TRAINING": 32,  # amortized: Z outside, or S/N below, the simulated range (values NULL)
    "NOT_GALAXY": 64,      # SPECTYPE is not GALAXY: no stellar-population model (values NULL)
    "NOT_YET_BUILT": 128,  # the core row changed since the layer ran and no fit has filled it yet (the next build does)
}
MIN_GOOD_BINS = 50
MIN_N_EFF = 100

#: Quantities reported as percentiles, in contract order (name -> column stem).
QUANTITIES: tuple[str, ...] = ("LogMass", "SFR", "sSFR", "Age", "Dust_Av", "Metallicity", "Tau", "t_quench")
PERCENTILES = (16, 50, 84)


@dataclass(frozen=True)
class FitConfig:
    """Sampler settings. The defaults are a production fit (~6 min on 1 core)."""

    n_live: int = 400
    """Nautilus live points (bagpipes' default)."""
    n_networks: int = 4
    """Nautilus neural networks per bound."""
    n_draws: int = 200
    """Equal-weight posterior draws kept in the side table."""
    seed: int | None = 0
    """Seed of numpy's global generator (nautilus draws from it); None leaves it alone."""
    keep_files: bool = False
    """Keep bagpipes' own ``pipes/posterior/<run>/<id>.h5`` in the work folder."""


@dataclass
class FitResult:
    """The outcome of one fit."""

    targetid: int
    row: dict
    """Every column of BAGPIPES_COLUMNS (None = NULL)."""
    draws: dict[str, np.ndarray] = field(default_factory=dict)
    """Quantity -> (n_draws,) posterior draws; empty when the fit failed."""
    model: np.ndarray | None = None
    """(NPIX,) best-fit model flux on the brz grid (1e-17 erg/s/cm2/A), NaN outside the fitted range."""
    runtime_s: float = 0.0
    message: str = ""


def null_row(targetid: int, flag: int, source: str | None = "bagpipes") -> dict:
    """A contract row with every value NULL and ``Bagpipes_flag`` = ``flag``."""
    row = {c.name: None for c in BAGPIPES_COLUMNS}
    row.update(TargetID=int(targetid), Physics_Source=source, Bagpipes_flag=int(flag))
    return row


def summarise(targetid: int, draws: dict[str, np.ndarray], flag: int, source: str) -> dict:
    """p16/p50/p84 of every quantity from posterior draws -> one contract row."""
    row = null_row(targetid, flag, source)
    for q in QUANTITIES:
        vals = np.asarray(draws[q], dtype=float)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            continue
        for p, v in zip(PERCENTILES, np.percentile(vals, PERCENTILES)):
            row[f"{q}_p{p}"] = float(v)
    return row


def prior_edge_flag(massformed_median: float) -> int:
    """``AT_PRIOR_EDGE`` when the median mass formed lies within 0.05 dex of its prior's bounds, else 0. The prior
    bounds the mass formed, not the surviving LogMass (0.2-0.35 dex lower), which can never reach the upper bound."""
    lo, hi = pm.PRIORS[0].low, pm.PRIORS[0].high
    return FLAGS["AT_PRIOR_EDGE"] if massformed_median < lo + 0.05 or massformed_median > hi - 0.05 else 0


def derived_draws(samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reported quantities from a bagpipes posterior ``samples`` dict."""
    age, tau = samples["delayed:age"], samples["delayed:tau"]
    return {
        "LogMass": np.asarray(samples["stellar_mass"], float),
        "SFR": pm.floor_sfr(samples["sfr"]),  # the contract's floors, as the amortized rows
        "sSFR": pm.floor_ssfr(samples["ssfr"]),
        "Age": np.asarray(samples["mass_weighted_age"], float),
        "Dust_Av": np.asarray(samples["dust:Av"], float),
        "Metallicity": np.asarray(samples["delayed:metallicity"], float),
        "Tau": np.asarray(tau, float),
        "t_quench": pm.t_quench(age, tau),
    }


def _checked_input(z: float, flux: np.ndarray, ivar: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    flag = 0
    if z is None or not np.isfinite(z) or z <= 0 or z > 10:
        flag |= FLAGS["BAD_REDSHIFT"]
    bflux, bivar = pm.bin_spectra(flux, ivar)
    good = bivar[0] > 0
    if good.sum() < MIN_GOOD_BINS:
        flag |= FLAGS["NO_DATA"]
    return flag, pm.fit_wavelengths()[good], bflux[0][good], bivar[0][good]


def fit_galaxy(
    targetid: int,
    z: float,
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    veldisp: float | None = None,
    workdir: Path | str,
    config: FitConfig = FitConfig(),
) -> FitResult:
    """Fit one brz-grid spectrum (flux/ivar in DESI units) at fixed redshift ``z``.

    ``workdir`` receives bagpipes' ``pipes/`` tree (removed after the fit
    unless ``config.keep_files``). Never raises for bad data or a failed fit.
    """
    t0 = time.perf_counter()
    flag, wave, bflux, bivar = _checked_input(z, flux, ivar)
    if flag:
        return FitResult(int(targetid), null_row(targetid, flag), message="unusable input")
    pipes = load_bagpipes()
    spectrum = np.column_stack([wave, bflux * 1e-17, 1e-17 / np.sqrt(bivar)])
    run = f"ard_{os.getpid()}"
    ident = str(int(targetid))
    try:
        with pipes_workdir(workdir), contextlib.redirect_stdout(io.StringIO()):
            if config.seed is not None:
                np.random.seed(config.seed)
            galaxy = pipes.galaxy(ident, lambda _id: spectrum, photometry_exists=False, spectrum_exists=True)
            fit = pipes.fit(galaxy, pm.fit_instructions(z, veldisp), run=run, n_posterior=config.n_draws)
            fit.fit(verbose=False, sampler="nautilus", n_live=config.n_live, n_networks=config.n_networks, pool=1)
            n_eff = 1.0 / float(fit.results["lnz_err"]) ** 2
            draws = derived_draws(fit.posterior.samples)
            massformed = float(np.median(fit.posterior.samples["delayed:massformed"]))
            model = _best_model(pipes, fit, z, veldisp)
            if not config.keep_files:
                shutil.rmtree(Path(workdir) / "pipes" / "posterior" / run, ignore_errors=True)
    except Exception as exc:  # any sampler/model failure -> NULL + flag
        row = null_row(targetid, FLAGS["FIT_FAILED"])
        return FitResult(int(targetid), row, runtime_s=time.perf_counter() - t0,
                         message=f"target {targetid}: bagpipes fit failed: {type(exc).__name__}: {exc}")
    runtime = time.perf_counter() - t0
    if n_eff < MIN_N_EFF:
        return FitResult(int(targetid), null_row(targetid, FLAGS["NOT_CONVERGED"]), runtime_s=runtime,
                         message=f"target {targetid}: effective sample size {n_eff:.0f} < {MIN_N_EFF}")
    row = summarise(targetid, draws, prior_edge_flag(massformed), "bagpipes")
    return FitResult(int(targetid), row, draws, model, runtime, message=f"n_eff={n_eff:.0f}")


def _best_model(pipes, fit, z: float, veldisp: float | None) -> np.ndarray:
    """Maximum-likelihood draw's model (with its calibration polynomial) on the brz grid."""
    samples, lnlike = fit.results["samples2d"], fit.results["lnlike"]
    best = samples[int(np.argmax(lnlike))]
    fm = fit.fitted_model
    fm.lnlike(best)  # sets fm.model_components and fm.calib for this draw
    comps = {k: (dict(v) if isinstance(v, dict) else v) for k, v in fm.model_components.items()}
    comps.pop("calib", None)
    comps.pop("noise", None)
    wave = grid.brz_wavelength()
    data_wave = fit.galaxy.spectrum[:, 0]
    inside = (wave >= data_wave[0]) & (wave <= data_wave[-1])
    mg = pipes.model_galaxy(comps, spec_wavs=wave[inside])
    spec = mg.spectrum[:, 1]
    if hasattr(fm, "calib"):
        spec = spec / np.interp(wave[inside], data_wave, fm.calib.model)
    out = np.full(grid.NPIX, np.nan)
    out[inside] = spec * 1e17
    return out
