"""Stellar and gas kinematics and emission-line fluxes with pPXF (reference mode).

One pPXF fit (Cappellari 2017) per spectrum: stars (V, sigma) from the BC03
MILES templates of ``ard_sql.science.templates``, two gas components (Balmer
lines; forbidden lines) with their own V and sigma, an additive Legendre
polynomial, and the 12 lines of ``ard_sql.contract.PPXF_LINES`` as Gaussians
with free fluxes. The batched fitter (``fastfit``) shares every step before the
fit (``prepare``), so the two modes see identical pixels.

Resolution matching. DESI's LSF (``SpectraBatch.lsf_sigma``, FWHM ~1.8 A
observed) is sharper than MILES (2.51 A rest) at every redshift, so the
galaxy is degraded, pixel by pixel, to the rest-frame FWHM
``max(template, galaxy)``; where a galaxy is broader than the templates (e.g.
SDSS) the templates are broadened instead. Gas Gaussians are made at that
same effective FWHM, so every returned sigma is intrinsic.

Velocities are relative to the redshift Z (``V = c ln((1+z_fit)/(1+Z))``); a
stellar |V| above ``V_STAR_OFFSET_KMS`` (300 km/s) is kept and flagged ``V_STAR_OFFSET``.
Line fluxes are observed-frame, in 1e-17 erg/s/cm2. Errors are pPXF's formal
errors times sqrt(reduced chi2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.interpolate import CubicSpline

C_KMS = 299792.458

#: The 12 lines: contract name -> (vacuum rest wavelength A, kinematic component 1=Balmer, 2=forbidden).
LINES: dict[str, tuple[float, int]] = {
    "OII_3726": (3727.092, 2), "OII_3729": (3729.875, 2), "Hdelta": (4102.892, 1), "Hgamma": (4341.684, 1),
    "Hbeta": (4862.683, 1), "OIII_4959": (4960.295, 2), "OIII_5007": (5008.240, 2), "NII_6548": (6549.86, 2),
    "Halpha": (6564.61, 1), "NII_6584": (6585.27, 2), "SII_6716": (6718.29, 2), "SII_6731": (6732.67, 2),
}
LINE_NAMES = list(LINES)

#: Emission lines not reported but common (LINERs, Seyferts, star-forming): masked, +-``nuisance_mask`` km/s.
NUISANCE_LINES = {"NeIII_3869": 3869.86, "H8": 3890.15, "NeIII_3968": 3968.59, "Hepsilon": 3971.20,
                  "NI_5200": 5199.35, "HeI_5876": 5877.25, "OI_6300": 6302.05, "OI_6364": 6365.54}

#: PPXF_flag bits.
FLAGS: dict[str, int] = {
    "NO_COVERAGE": 1 << 0,        # fewer than min_pixels good pixels in the rest-frame fit range: all NULL
    "BAD_REDSHIFT": 1 << 1,       # Z missing, negative, or not a galaxy (SPECTYPE != GALAXY): all NULL
    "FIT_FAILED": 1 << 2,         # the fit raised or returned non-finite numbers: all NULL
    "SIGMA_AT_BOUND": 1 << 3,     # stellar sigma hit a fit bound (unresolved or > 1000 km/s): VelDisp NULL
    "SIGMA_UNRESOLVED": 1 << 4,   # stellar sigma < half the effective instrumental sigma (value kept, upper-limit like)
    "NO_BALMER_GAS": 1 << 5,      # no Balmer line covered or detected (S/N >= 3), or Balmer gas sigma at a bound: Balmer V, sigma NULL
    "NO_FORBIDDEN_GAS": 1 << 6,   # the same for the forbidden-line component
    "NO_GAS_AV": 1 << 7,          # Halpha or Hbeta missing or S/N < 3: Gas_Av NULL
    "NOT_CONVERGED": 1 << 8,      # fast mode only: the kinematics did not converge: every fitted value NULL (kinematics, fluxes, chi2, Gas_Av, models)
    "STARS_UNCONSTRAINED": 1 << 9,  # stellar V at its +-v_bound, or a zero / non-finite stellar error: VelDisp, V_star NULL
    "V_STAR_OFFSET": 1 << 10,     # |V_star| > V_STAR_OFFSET_KMS: the fit's velocity is far from the catalogue's redshift; kinematics suspect (values kept)
    "GAS_SIGMA_AT_UPPER_BOUND": 1 << 11,  # a gas component's sigma at the upper bound: its lines' fluxes kept but suspect (a Gaussian that wide can absorb continuum mismatch)
    **{f"LINE_{name}": 1 << (16 + i) for i, name in enumerate(LINE_NAMES)},  # line outside coverage / masked: flux NULL
}

#: ``V_STAR_OFFSET`` threshold (km/s). The redshift Z is fitted to this same spectrum, so the stars
#: should sit within Z's error of it (DESI's ZERR: typically tens of km/s); on the mock V_star is
#: within 1.2 km/s of the truth (README). 300 km/s is far beyond both: the fit may have locked onto
#: the wrong features, or Z itself may be wrong (then the offset is real), so the values are kept
#: and only flagged.
V_STAR_OFFSET_KMS = 300.0


def gas_sigma_at_upper_bound(sigma: float, config: "FitConfig") -> bool:
    """Whether a gas component's fitted sigma sits at the upper fit bound (within 1%).

    Its V and sigma are then NULL (as at the lower bound), but its line fluxes are kept: at the lower
    bound the line is unresolved or undetected and its flux (or ``3 * err`` upper limit) is still a
    measurement; at the upper bound a very broad Gaussian may be absorbing continuum mismatch, so
    the fluxes are flagged ``GAS_SIGMA_AT_UPPER_BOUND`` for the user to judge.
    """
    return bool(sigma >= config.sigma_bounds[1] * 0.99)


def kinematics_constrained(v: float, v_err: float, s_err: float, config: "FitConfig") -> bool:
    """Whether a component's fitted V and sigma are measurements: V off its bounds, both errors finite and > 0.

    A V at +-``v_bound`` or a zero error (a singular Jacobian: e.g. no stellar template weight) means
    the fit did not constrain the component, and its starting values must not be reported.
    """
    return bool(abs(v) < 0.99 * config.v_bound and np.isfinite(v_err) and np.isfinite(s_err) and v_err > 0 and s_err > 0)


#: A gas component's V and sigma are reported only when one of its lines has flux / error >= this.
GAS_DETECTION_SNR = 3.0

#: Cardelli et al. (1989), R_V = 3.1, and the case-B Halpha/Hbeta ratio (T = 1e4 K).
K_HBETA, K_HALPHA, R_V, BALMER_DECREMENT = 3.61, 2.53, 3.1, 2.86


@dataclass
class FitConfig:
    """Settings shared by the reference (pPXF) and fast fitters."""

    velscale: float = 50.0
    """Log-lambda pixel size (km/s); DESI pixels are 24-67 km/s, the matched LSF sigma >= 46 km/s."""
    rest_range: tuple[float, float] = (3590.0, 7290.0)
    """Rest-frame range fitted (A): inside MILES (3540-7350 A) with room for |V| <= 1000 km/s."""
    degree: int = 4
    """Additive Legendre polynomial degree."""
    sigma_start: float = 150.0
    gas_sigma_start: float = 80.0
    v_bound: float = 1000.0
    sigma_bounds: tuple[float, float] = (5.0, 1000.0)
    min_pixels: int = 200
    nuisance_mask: float = 600.0
    """Half-width (km/s) of the masks around ``NUISANCE_LINES``."""
    line_min_good: float = 0.6
    """A line's flux is NULL when less than this fraction of the pixels within +-3 sigma_LSF of it are good."""
    threads: int = 1
    """BLAS threads per fit (OMP_NUM_THREADS style); 1 is fastest per core for pPXF's small matrices."""


@dataclass
class Prepared:
    """Spectra on the common observed-frame log-lambda grid, resolution-matched to the templates."""

    ln_lam: np.ndarray            # (m,) observed ln(lambda/A)
    flux: np.ndarray              # (n, m)
    noise: np.ndarray             # (n, m) 1-sigma; inf where bad
    good: np.ndarray              # (n, m) bool: good and inside the rest-frame fit range
    fwhm_rest: np.ndarray         # (n, m) effective rest-frame FWHM (A) after matching
    fwhm_gal_rest: np.ndarray     # (n, m) the galaxy's own rest-frame FWHM (A) before matching
    tpl_sigma_extra: np.ndarray   # (n,) km/s: median extra Gaussian the templates need (0 for DESI)
    z: np.ndarray                 # (n,)
    usable: np.ndarray            # (n,) bool
    flag: np.ndarray              # (n,) int32 flags set during preparation
    err_scale: np.ndarray | None = None
    """(n, m) factor >= 1 by which ``noise`` understates a fitted quantity's error (see ``prepare``)."""


@dataclass
class KinematicsResult:
    """Per-spectrum results: contract columns (NaN = NULL), flags, and best-fit models on the input grid."""

    columns: dict[str, np.ndarray]
    flag: np.ndarray
    stars_model: np.ndarray
    gas_model: np.ndarray
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _interp_many(x_out: np.ndarray, x: np.ndarray, *ys: np.ndarray) -> list[np.ndarray]:
    """Linear interpolation of every row of each ``y`` (defined on ``x``) at ``x_out`` (one search)."""
    j = np.clip(np.searchsorted(x, x_out) - 1, 0, x.size - 2)
    t = (x_out - x[j]) / (x[j + 1] - x[j])
    return [y[:, j] * (1 - t) + y[:, j + 1] * t for y in ys]


def resample_templates(lam: np.ndarray, flux: np.ndarray, velscale: float) -> tuple[np.ndarray, np.ndarray]:
    """(npix, ntemp) templates onto a ln(lambda) grid of step ``velscale``, as pPXF prepares them; returns (flux, ln_lam).

    pPXF's flux-conserving log-rebinning (``ppxf.ppxf_util.log_rebin``, what ``sps_lib`` does; the
    same pixel borders and grid, written here so that the fast mode does not run pPXF's code): the
    template is a step function over its pixels, and each log pixel gets its exact mean over the
    pixel's width. That adds the pixel's boxcar (sigma = velscale / sqrt(12), 14 km/s at 50 km/s)
    to the templates' stated FWHM, which pPXF's convention leaves uncounted; sampling the templates
    by a spline instead gives ~1-2 km/s larger sigma at 100 km/s. Both fitters follow pPXF here, so
    that VelDisp agrees with pPXF as it is run on the same templates (bench/RESULTS.md, "Template
    rebinning").
    """
    lam = np.asarray(lam, np.float64)
    flux = np.asarray(flux, np.float64)
    lim = 1.5 * lam[[0, -1]] - 0.5 * lam[[1, -2]]
    borders = np.concatenate([lim[:1], (lam[1:] + lam[:-1]) / 2, lim[1:]])
    m = int(C_KMS * np.log(lim[1] / lim[0]) / velscale)
    new = np.exp(np.log(lim[0]) + velscale / C_KMS * np.arange(m + 1))
    # integral of the step function from the first border to each new border
    cum = np.concatenate([np.zeros((1,) + flux.shape[1:]), np.cumsum(flux * np.diff(borders)[:, None], axis=0)])
    k = (np.searchsorted(borders, new) - 1).clip(0, lam.size - 1)
    integral = cum[k] + (new - borders[k])[:, None] * flux[k]
    return np.diff(integral, axis=0) / np.diff(new)[:, None], 0.5 * np.log(new[1:] * new[:-1])


def log_grid(wave: np.ndarray, velscale: float) -> np.ndarray:
    """Observed ln(lambda) grid with step ``velscale`` covering ``wave``."""
    step = velscale / C_KMS
    lo, hi = np.log(wave[0]), np.log(wave[-1])
    return lo + step * (0.5 + np.arange(int((hi - lo) / step)))


def _smooth_rows(y: np.ndarray, var: np.ndarray, bad: np.ndarray, sig_px: np.ndarray):
    """Gaussian smoothing of each row with per-pixel width ``sig_px`` (the kernel belongs to the output pixel).

    Returns the smoothed ``y``, the propagated variance (diagonal: sum k^2 var), the kernel-weighted
    fraction of ``bad`` pixels and the kernel-weighted variance (sum k var: a row sum of the smoothed
    noise's covariance, see ``prepare``). Each row's kernel reaches +-4 of its own largest sigma, so a spectrum is
    prepared the same whatever else is in its batch; rows of the same reach are done together. The
    kernel taps are made on the fly by recurrence, exp(q k^2) = exp(q (k-1)^2) r_k with
    r_k = r_(k-1) exp(2q), so no (taps, n, npix) array is held, and the sums go through preallocated
    buffers (large numpy temporaries cost a page fault per use).
    """
    npix = y.shape[1]
    reach = np.maximum(1, np.ceil(4 * np.nanmax(np.nan_to_num(sig_px), axis=1, initial=0.25))).astype(int)
    out_y, out_v, out_b, out_kv = np.empty(y.shape), np.empty(y.shape), np.empty(y.shape), np.empty(y.shape)
    for half in np.unique(reach):
        rows = np.flatnonzero(reach == half)
        q = -0.5 / np.maximum(sig_px[rows], 1e-3) ** 2
        pad = lambda a: np.pad(a, [(0, 0), (half, half)], mode="edge")  # noqa: E731
        yp, vp, bp = pad(y[rows]), pad(var[rows]), pad(bad[rows].astype(np.float64))
        acc_y, acc_v, acc_b = y[rows].astype(np.float64), var[rows].astype(np.float64), bad[rows].astype(np.float64)
        acc_kv = acc_v.copy()
        norm, g, r = np.ones_like(q), np.ones_like(q), np.exp(q)
        e2q, g2, tmp = r * r, np.empty_like(q), np.empty_like(q)
        for k in range(1, half + 1):
            g *= r
            r *= e2q
            np.multiply(g, g, out=g2)
            lo, hi = slice(half - k, half - k + npix), slice(half + k, half + k + npix)
            for acc, padded, wk in ((acc_y, yp, g), (acc_v, vp, g2), (acc_b, bp, g), (acc_kv, vp, g)):
                np.add(padded[:, lo], padded[:, hi], out=tmp)
                tmp *= wk
                acc += tmp
            norm += 2 * g
        out_y[rows], out_v[rows], out_b[rows], out_kv[rows] = acc_y / norm, acc_v / norm**2, acc_b / norm, acc_kv / norm
    return out_y, out_v, out_b, out_kv


def prepare(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, lsf_sigma: np.ndarray,
            z: np.ndarray, template_fwhm: float | tuple[np.ndarray, np.ndarray], config: FitConfig) -> Prepared:
    """Resolution-match and log-rebin a batch of spectra on one linear grid (shared by both modes).

    ``lsf_sigma`` is the galaxy's Gaussian LSF sigma in observed A, (npix,) or (n, npix);
    ``template_fwhm`` the templates' rest-frame FWHM (A): a constant, or (rest wavelengths,
    FWHM) of a library whose resolution varies (taken at each pixel's rest wavelength).
    """
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, np.float64))
    n = flux.shape[0]
    z = np.asarray(z, np.float64).reshape(n)
    bad = ~(np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0))
    if mask is not None:
        bad |= np.atleast_2d(mask) != 0
    flag = np.zeros(n, np.int32)
    zok = np.isfinite(z) & (z >= 0) & (z < 5)
    flag[~zok] |= FLAGS["BAD_REDSHIFT"]
    zz = np.where(zok, z, 0.0)
    # interpolate over bad pixels so that smoothing does not spread garbage; they stay masked below
    y = flux.copy()
    idx = np.arange(wave.size)
    for i in np.flatnonzero(bad.any(1)):
        g = ~bad[i]
        y[i] = np.interp(idx, idx[g], flux[i, g]) if g.sum() > 1 else 0.0
    var = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, ivar))
    fwhm_gal_obs = 2.3548 * np.broadcast_to(np.asarray(lsf_sigma, np.float64), flux.shape)
    if isinstance(template_fwhm, tuple):
        lam_t, fwhm_t = (np.asarray(a, np.float64) for a in template_fwhm)
        fwhm_t_obs = np.interp(wave[None, :] / (1 + zz)[:, None], lam_t, fwhm_t) * (1 + zz)[:, None]
    else:
        fwhm_t_obs = template_fwhm * (1 + zz)[:, None]
    dl = np.gradient(wave)
    extra_px = np.sqrt(np.clip(fwhm_t_obs**2 - fwhm_gal_obs**2, 0, None)) / 2.3548 / dl
    y, var, badfrac, var_k = _smooth_rows(y, var, bad, extra_px)  # var: the diagonal of the smoothed noise
    fwhm_eff_obs = np.maximum(fwhm_t_obs, fwhm_gal_obs)
    # templates broadened where the galaxy is broader than them (not DESI): one velocity sigma per spectrum
    diff = np.clip(fwhm_gal_obs**2 - fwhm_t_obs**2, 0, None)
    tpl_extra = np.zeros(n)
    broad = diff.any(1)
    if broad.any():
        tpl_extra[broad] = np.median(np.sqrt(diff[broad]) / 2.3548 / wave * C_KMS, axis=1)
    # resample by cubic spline at the log-pixel centres: DESI fluxes are samples of an LSF-convolved
    # spectrum, and a flux-conserving (boxcar) rebin would broaden lines by the pixel width again
    ln_lam = log_grid(wave, config.velscale)
    lam_out = np.exp(ln_lam)
    flux_log = CubicSpline(wave, y, axis=1)(lam_out)
    var_log, badfrac_log, fwhm_log, fwhm_gal_log, var_k_log = _interp_many(
        lam_out, wave, var, badfrac, fwhm_eff_obs, fwhm_gal_obs, var_k)
    bad_log = badfrac_log > 0.05
    fwhm_log /= (1 + zz)[:, None]
    fwhm_gal_log /= (1 + zz)[:, None]
    ln_rest = ln_lam[None, :] - np.log1p(zz)[:, None]
    inside = (ln_rest >= np.log(config.rest_range[0])) & (ln_rest <= np.log(config.rest_range[1]))
    for wl in NUISANCE_LINES.values():
        inside &= np.abs(ln_rest - np.log(wl)) > config.nuisance_mask / C_KMS
    good = inside & ~bad_log & (var_log > 0) & np.isfinite(flux_log)
    noise = np.where(good, np.sqrt(np.where(var_log > 0, var_log, 1.0)), np.inf)
    usable = zok & (good.sum(1) >= config.min_pixels)
    flag[zok & ~usable] |= FLAGS["NO_COVERAGE"]
    # The fits weight the pixels by ``noise`` as if independent, but smoothing and resampling spread
    # each input pixel's noise over neighbouring log pixels. For a quantity that many neighbouring
    # pixels constrain alike, the error grows by sqrt(row sum of the noise covariance / its diagonal).
    # With S the smoothing and P the resampling, the row sum of P S V S^T P^T is P S (V S^T P^T 1),
    # and P^T 1 ~ rho (log pixels per input pixel), smooth on the kernel's scale: P (rho * S v).
    rho_in = np.gradient(wave) / (wave * config.velscale / C_KMS)
    row_sum = np.interp(lam_out, wave, rho_in)[None, :] * var_k_log
    with np.errstate(invalid="ignore", divide="ignore"):
        err_scale = np.sqrt(np.maximum(1.0, np.where(good, row_sum / var_log, 1.0)))
    return Prepared(ln_lam, flux_log, noise, good, fwhm_log, fwhm_gal_log, tpl_extra, z, usable, flag, err_scale)


def near_lines(wave: np.ndarray, z: np.ndarray, half_width_kms: float) -> np.ndarray:
    """(n, npix) bool: observed pixels within +-``half_width_kms`` of any of the 12 ``LINES`` at each redshift."""
    rest = np.asarray(wave, float)[None, :] / (1 + np.atleast_1d(np.asarray(z, float))[:, None])
    near = np.zeros(rest.shape, bool)
    for wl, _kind in LINES.values():
        near |= np.abs(rest - wl) < wl * half_width_kms / C_KMS
    return near


def line_pixels(prep: Prepared, rows: np.ndarray | None = None) -> np.ndarray:
    """(n, 12) fractional index on the ``prep.ln_lam`` grid of each line at each spectrum's redshift."""
    z = prep.z if rows is None else prep.z[rows]
    step = prep.ln_lam[1] - prep.ln_lam[0]
    lnw = np.log([wl for wl, _ in LINES.values()])
    return (lnw[None, :] + np.log1p(np.where(np.isfinite(z), z, 0.0))[:, None] - prep.ln_lam[0]) / step


def at_lines(values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of (n, m) per-pixel ``values`` at (n, k) fractional pixel positions (clamped)."""
    m = values.shape[1]
    p = np.clip(pos, 0, m - 1)
    j = np.clip(np.floor(p).astype(np.int64), 0, m - 2)
    t = p - j
    return np.take_along_axis(values, j, 1) * (1 - t) + np.take_along_axis(values, j + 1, 1) * t


def line_coverage(prep: Prepared, config: FitConfig) -> np.ndarray:
    """(n, 12) bool: the line lies in the fit range with enough good pixels within +-3 LSF sigma of it."""
    n, m = prep.flux.shape
    wl = np.array([w for w, _ in LINES.values()])
    step = prep.ln_lam[1] - prep.ln_lam[0]
    pos = line_pixels(prep)
    sig = np.maximum(at_lines(prep.fwhm_rest, pos) / 2.3548, 1.0)  # rest A
    half = 3 * sig / wl[None, :] / step  # pixels
    a = np.clip(np.ceil(pos - half), 0, m).astype(np.int64)
    b = np.clip(np.floor(pos + half), -1, m - 1).astype(np.int64)
    csum = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(prep.good, 1)], 1)
    ngood = np.take_along_axis(csum, b + 1, 1) - np.take_along_axis(csum, a, 1)
    npix = b - a + 1
    inside = (config.rest_range[0] + 5 < wl) & (wl < config.rest_range[1] - 5)
    on_grid = (pos - half >= 0) & (pos + half <= m - 1)  # the whole +-3 sigma window is observed
    ok = on_grid & (npix > 0) & (ngood >= config.line_min_good * np.maximum(npix, 1)) & inside[None, :]
    return ok & prep.usable[:, None]


def gas_av(f_ha: np.ndarray, e_ha: np.ndarray, f_hb: np.ndarray, e_hb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A_V (mag) and its error from the Balmer decrement (Cardelli R_V=3.1, case B 2.86); NaN when S/N < 3."""
    ok = (f_ha / e_ha >= 3) & (f_hb / e_hb >= 3)
    ratio = np.where(ok, f_ha / np.where(ok, f_hb, 1), np.nan)
    fac = 2.5 * R_V / (K_HBETA - K_HALPHA)
    av = fac * np.log10(ratio / BALMER_DECREMENT)
    err = fac / np.log(10) * np.sqrt((e_ha / f_ha) ** 2 + (e_hb / f_hb) ** 2)
    return av, np.where(ok, err, np.nan)


def empty_columns(n: int) -> dict[str, np.ndarray]:
    """All numeric contract columns of the ppxf layer, filled with NaN (NULL)."""
    from ard_sql.contract import PPXF_COLUMNS

    skip = {"TargetID", "PPXF_mode", "PPXF_flag"}
    return {c.name: np.full(n, np.nan) for c in PPXF_COLUMNS if c.name not in skip}


#: Columns whose error comes from the whole fitted range (scaled by the spectrum's median ``err_scale``).
KINEMATIC_COLUMNS = ("VelDisp", "V_star", "V_gas_balmer", "Sigma_gas_balmer", "V_gas_forbidden", "Sigma_gas_forbidden")


def scale_errors(cols: dict[str, np.ndarray], prep: Prepared) -> None:
    """Multiply the fitted errors by ``prep.err_scale`` (in place): the noise correlation the fits ignore.

    A line flux takes the factor at its line's pixel, the kinematics the median over the fitted
    pixels. Without it the errors were ~2x too small on the mock (pulls against the truth,
    bench/RESULTS.md "pPXF layer against the mock truth").
    """
    if prep.err_scale is None:
        return
    sc = np.where(prep.good, prep.err_scale, np.nan)
    with np.errstate(invalid="ignore"):
        per_spec = np.nan_to_num(np.nanmedian(np.where(prep.good.any(1)[:, None], sc, 1.0), axis=1), nan=1.0)
    for c in KINEMATIC_COLUMNS:
        cols[f"{c}_err"] = cols[f"{c}_err"] * per_spec
    m = prep.err_scale.shape[1]
    pix = np.clip(np.rint(np.nan_to_num(line_pixels(prep))), 0, m - 1).astype(int)
    at_line = np.take_along_axis(prep.err_scale, pix, axis=1)
    for j, name in enumerate(LINE_NAMES):
        cols[f"{name}_Flux_err"] = cols[f"{name}_Flux_err"] * at_line[:, j]


def finalize_flags(cols: dict[str, np.ndarray], flag: np.ndarray, covered: np.ndarray) -> None:
    """Set line, gas and A_V flags from the NaN pattern of ``cols``, and ``V_STAR_OFFSET`` from V_star (in place).

    Shared by both fitters (through :meth:`FitRun.finish`), so the two modes flag alike.
    """
    for j, name in enumerate(LINE_NAMES):
        flag[~covered[:, j]] |= FLAGS[f"LINE_{name}"]
        cols[f"{name}_Flux"][~covered[:, j]] = np.nan
        cols[f"{name}_Flux_err"][~covered[:, j]] = np.nan
    # gas kinematics of a component none of whose lines is detected (S/N >= 3) are not measured: the fit
    # leaves them near their starting values, which must not be reported as numbers
    for group, tag in ((1, "balmer"), (2, "forbidden")):
        names = [nm for nm in LINE_NAMES if LINES[nm][1] == group]
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.stack([cols[f"{nm}_Flux"] / cols[f"{nm}_Flux_err"] for nm in names], 1)
        detected = np.nan_to_num(snr, nan=0.0).max(1) >= GAS_DETECTION_SNR
        for c in (f"V_gas_{tag}", f"Sigma_gas_{tag}"):
            cols[c][~detected] = np.nan
            cols[f"{c}_err"][~detected] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        av, av_err = gas_av(cols["Halpha_Flux"], cols["Halpha_Flux_err"], cols["Hbeta_Flux"], cols["Hbeta_Flux_err"])
    cols["Gas_Av"], cols["Gas_Av_err"] = av, av_err
    fitted = ~(flag & (FLAGS["NO_COVERAGE"] | FLAGS["BAD_REDSHIFT"] | FLAGS["FIT_FAILED"])).astype(bool)
    flag[fitted & ~np.isfinite(av)] |= FLAGS["NO_GAS_AV"]
    flag[fitted & ~np.isfinite(cols["Sigma_gas_balmer"])] |= FLAGS["NO_BALMER_GAS"]
    flag[fitted & ~np.isfinite(cols["Sigma_gas_forbidden"])] |= FLAGS["NO_FORBIDDEN_GAS"]
    # a NULL V_star (no stellar fit) reads as 0 here: no flag on a velocity that was never reported
    flag[np.abs(np.nan_to_num(cols["V_star"], nan=0.0)) > V_STAR_OFFSET_KMS] |= FLAGS["V_STAR_OFFSET"]


def model_to_linear(ln_lam: np.ndarray, model_log: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Interpolate (n, m) log-grid models to the linear grid ``wave``; NaN outside the fitted pixels."""
    lam = np.exp(ln_lam)
    out = np.full((model_log.shape[0], wave.size), np.nan, np.float32)
    for i, row in enumerate(model_log):
        ok = np.isfinite(row)
        if ok.sum() > 1:
            lo, hi = lam[ok][[0, -1]]
            inside = (wave >= lo) & (wave <= hi)
            out[i, inside] = np.interp(wave[inside], lam[ok], row[ok])
    return out


@dataclass
class FitRun:
    """What both fitters share around their fits: the prepared pixels, the outputs, the flags."""

    prep: Prepared
    cols: dict[str, np.ndarray]
    flag: np.ndarray
    covered: np.ndarray
    stars: np.ndarray
    """(n, m) best-fit stellar model on the log grid (NaN: no fit)."""
    gas: np.ndarray
    t0: float

    @classmethod
    def start(cls, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, lsf_sigma: np.ndarray,
              z: np.ndarray, template_fwhm: float | tuple[np.ndarray, np.ndarray], config: FitConfig) -> "FitRun":
        """Prepare the pixels and empty (NULL) outputs for every spectrum."""
        import time

        t0 = time.perf_counter()
        prep = prepare(wave, flux, ivar, mask, lsf_sigma, z, template_fwhm, config)
        n, m = prep.flux.shape
        return cls(prep, empty_columns(n), prep.flag.copy(), line_coverage(prep, config),
                   np.full((n, m), np.nan), np.full((n, m), np.nan), t0)

    def failed(self, rows: int | np.ndarray) -> None:
        """Rows whose fit raised: NULL everything, flag FIT_FAILED."""
        self.flag[rows] |= FLAGS["FIT_FAILED"]
        for v in self.cols.values():
            v[rows] = np.nan
        self.stars[rows] = np.nan
        self.gas[rows] = np.nan

    def finish(self, wave: np.ndarray) -> KinematicsResult:
        """Flags from the NULL pattern, models on the input grid, the result."""
        import time

        self.covered &= ~(self.flag & FLAGS["FIT_FAILED"]).astype(bool)[:, None]
        scale_errors(self.cols, self.prep)
        finalize_flags(self.cols, self.flag, self.covered)
        ln_lam = self.prep.ln_lam
        return KinematicsResult(self.cols, self.flag, model_to_linear(ln_lam, self.stars, wave),
                                model_to_linear(ln_lam, self.gas, wave), time.perf_counter() - self.t0)


class ReferenceFitter:
    """Real pPXF, one spectrum at a time, with the shared templates, gas lines and preprocessing."""

    def __init__(self, template_path, config: FitConfig | None = None):
        from ard_sql.science.templates import load_templates

        self.config = config or FitConfig()
        self.tpl = load_templates(template_path)
        tpl_log, ln_lam_t = resample_templates(self.tpl.lam, self.tpl.flux, self.config.velscale)
        self.tpl_log, self.ln_lam_tpl = tpl_log, ln_lam_t
        self.template_fwhm = (self.tpl.lam, self.tpl.fwhm)  # per wavelength: a library's resolution may vary

    def fit(self, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, lsf_sigma: np.ndarray,
            z: np.ndarray) -> KinematicsResult:
        """Fit every spectrum; never raises for a bad spectrum (NULLs + flag instead)."""
        run = FitRun.start(wave, flux, ivar, mask, lsf_sigma, z, self.template_fwhm, self.config)
        with _blas_threads(self.config.threads):
            for i in np.flatnonzero(run.prep.usable):
                try:
                    self._fit_one(run.prep, i, run.covered[i], run.cols, run.stars, run.gas, run.flag)
                except Exception:  # noqa: BLE001 - a failed fit is NULLs + a flag, never a crashed build
                    run.failed(i)
        return run.finish(wave)

    def _fit_one(self, prep: Prepared, i: int, covered: np.ndarray, cols, stars, gas, flag) -> None:
        from ppxf import ppxf_util
        from ppxf.ppxf import ppxf

        cfg = self.config
        z = prep.z[i]
        sel = np.flatnonzero(prep.good[i])
        sel = np.arange(sel[0], sel[-1] + 1)
        lam = np.exp(prep.ln_lam[sel]) / (1 + z)
        scale = float(np.median(prep.flux[i, prep.good[i]]))
        scale = scale if scale > 0 else float(np.mean(np.abs(prep.flux[i, prep.good[i]]))) or 1.0
        galaxy = prep.flux[i, sel] / scale
        goodpix = np.flatnonzero(prep.good[i, sel])
        noise = np.where(np.isfinite(prep.noise[i, sel]), prep.noise[i, sel], 1e10) / scale
        tpl = self.tpl_log
        if prep.tpl_sigma_extra[i] > 0:
            # the galaxy is broader than the templates somewhere (not DESI): broaden them there, as sps_lib does
            lam_t = np.exp(self.ln_lam_tpl)
            fwhm_g = np.interp(lam_t, lam, prep.fwhm_gal_rest[i, sel])
            sig = np.sqrt(np.clip(fwhm_g**2 - np.interp(lam_t, self.tpl.lam, self.tpl.fwhm) ** 2, 0, None)) / 2.3548
            tpl = ppxf_util.varsmooth(lam_t, tpl, sig)
        fwhm_fn = lambda w: np.interp(w, lam, prep.fwhm_rest[i, sel])  # noqa: E731
        names = [nm for nm, ok in zip(LINE_NAMES, covered) if ok]
        waves = np.array([LINES[nm][0] for nm in names])
        kinds = [LINES[nm][1] for nm in names]
        comps = [0] * tpl.shape[1]
        templates = tpl
        present = sorted(set(kinds))
        if names:
            gas_t = ppxf_util.gaussian(self.ln_lam_tpl, waves, fwhm_fn, pixel=True)
            templates = np.column_stack([tpl, gas_t])
            remap = {k: 1 + present.index(k) for k in present}
            comps += [remap[k] for k in kinds]
        ncomp = 1 + len(present)
        start = [[0.0, cfg.sigma_start]] + [[0.0, cfg.gas_sigma_start]] * len(present)
        bounds = [[[-cfg.v_bound, cfg.v_bound], list(cfg.sigma_bounds)]] * ncomp
        comps = np.array(comps)
        if ncomp > 1:
            kin = {"start": start, "moments": [2] * ncomp, "bounds": bounds, "component": comps,
                   "gas_component": comps > 0, "gas_names": names}
        else:  # no gas line covered: pPXF wants one component given as plain vectors, not lists of them
            kin = {"start": start[0], "moments": 2, "bounds": bounds[0]}
        pp = ppxf(templates, galaxy, noise, cfg.velscale, degree=cfg.degree, mdegree=0, lam=lam,
                  lam_temp=np.exp(self.ln_lam_tpl), goodpixels=goodpix, quiet=True, **kin)
        sol, err = np.atleast_2d(pp.sol), np.atleast_2d(pp.error) * np.sqrt(pp.chi2)
        if not (np.all(np.isfinite(sol)) and np.isfinite(pp.chi2)):
            raise FloatingPointError("non-finite pPXF solution")
        lo, hi = cfg.sigma_bounds
        at_bound = lambda s: s <= lo * 1.01 or s >= hi * 0.99  # noqa: E731
        if not kinematics_constrained(sol[0, 0], err[0, 0], err[0, 1], cfg):
            flag[i] |= FLAGS["STARS_UNCONSTRAINED"]
        elif at_bound(sol[0, 1]):
            flag[i] |= FLAGS["SIGMA_AT_BOUND"]
            cols["V_star"][i], cols["V_star_err"][i] = sol[0, 0], err[0, 0]
        else:
            cols["VelDisp"][i], cols["VelDisp_err"][i] = sol[0, 1], err[0, 1]
            inst = np.median(prep.fwhm_rest[i, sel] / 2.3548 / lam) * C_KMS
            if sol[0, 1] < 0.5 * inst:
                flag[i] |= FLAGS["SIGMA_UNRESOLVED"]
            cols["V_star"][i], cols["V_star_err"][i] = sol[0, 0], err[0, 0]
        for k, tag in ((1, "balmer"), (2, "forbidden")):
            if k in present:
                c = 1 + present.index(k)
                if gas_sigma_at_upper_bound(sol[c, 1], cfg):
                    flag[i] |= FLAGS["GAS_SIGMA_AT_UPPER_BOUND"]
                if not at_bound(sol[c, 1]) and kinematics_constrained(sol[c, 0], err[c, 0], err[c, 1], cfg):
                    cols[f"V_gas_{tag}"][i], cols[f"V_gas_{tag}_err"][i] = sol[c, 0], err[c, 0]
                    cols[f"Sigma_gas_{tag}"][i], cols[f"Sigma_gas_{tag}_err"][i] = sol[c, 1], err[c, 1]
        if names:
            # pPXF's gas flux is a sum over pixels: x pixel width in observed A, back to physical units
            dlam_obs = waves * (1 + z) * (np.exp(cfg.velscale / C_KMS) - 1)
            fl = pp.gas_flux * scale * dlam_obs
            fe = pp.gas_flux_error * np.sqrt(pp.chi2) * scale * dlam_obs
            for nm, f, e in zip(names, fl, fe):
                cols[f"{nm}_Flux"][i], cols[f"{nm}_Flux_err"][i] = f, e
        cols["PPXF_Chi2"][i] = pp.chi2
        gas_fit = pp.gas_bestfit if names else np.zeros_like(pp.bestfit)
        stars[i, sel] = (pp.bestfit - gas_fit) * scale
        gas[i, sel] = gas_fit * scale


def _blas_threads(n: int):
    """Limit BLAS/OpenMP threads inside a block (pPXF's matrices are small: 1 thread is fastest per core)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n)


def synthetic_batch(template_path: Path | str, z: np.ndarray, sigma: np.ndarray, snr: np.ndarray,
                    line_flux: np.ndarray | None = None, gas_sigma: float = 60.0, v_star: np.ndarray | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Spectra on the DESI brz grid made from the templates themselves, with known truth (for tests and benches).

    Each spectrum mixes 3 random templates, broadened to ``sigma`` (km/s) and shifted by ``v_star``, at
    redshift ``z``; its LSF is the templates' own FWHM x (1+z) (returned per spectrum, observed A), so
    the fitters need not degrade it. ``line_flux`` (n, 12) adds the 12 lines (observed 1e-17 erg/s/cm2)
    with intrinsic dispersion ``gas_sigma``. Median continuum is 1; Gaussian noise 1/``snr`` per pixel.
    Returns (wave, flux, ivar, lsf_sigma (n, npix), truth dict).
    """
    from scipy.ndimage import gaussian_filter1d
    from scipy.special import erf

    from ard_sql.grid import brz_wavelength
    from ard_sql.science.templates import load_templates

    rng = np.random.default_rng(seed)
    tpl = load_templates(template_path)
    z, sigma, snr = (np.asarray(a, float) for a in (z, sigma, snr))
    n = z.size
    v_star = np.zeros(n) if v_star is None else np.asarray(v_star, float)
    wave = brz_wavelength()
    fine_vs = 5.0
    # sampled by a spline, not rebinned: a 5 km/s grid is much finer than the templates' pixels
    ln_fine = log_grid(tpl.lam, fine_vs)
    fine = CubicSpline(tpl.lam, tpl.flux, axis=0)(np.exp(ln_fine))
    fwhm_t = float(np.median(tpl.fwhm))
    flux = np.empty((n, wave.size))
    lsf = np.empty((n, wave.size))
    for i in range(n):
        w = np.zeros(fine.shape[1])
        w[rng.choice(fine.shape[1], 3, replace=False)] = rng.dirichlet(np.ones(3))
        spec = gaussian_filter1d(fine @ w, sigma[i] / fine_vs)
        lam_obs = np.exp(ln_fine) * (1 + z[i]) * np.exp(v_star[i] / C_KMS)
        cont = np.interp(wave, lam_obs, spec, left=np.nan, right=np.nan)
        cont /= np.nanmedian(cont)
        lsf[i] = fwhm_t * (1 + z[i]) / 2.3548
        if line_flux is not None:
            edges = np.concatenate([wave - 0.4, [wave[-1] + 0.4]])
            for j, (wl, _) in enumerate(LINES.values()):
                mu = wl * (1 + z[i])
                s = np.hypot(mu * gas_sigma / C_KMS, lsf[i, 0])
                cdf = 0.5 * (1 + erf((edges - mu) / (np.sqrt(2) * s)))
                cont += line_flux[i, j] * np.diff(cdf) / 0.8
        flux[i] = cont
    noise = 1.0 / snr[:, None] * np.ones_like(flux)
    good = np.isfinite(flux)
    flux = np.where(good, flux + rng.normal(size=flux.shape) * noise, 0.0)
    ivar = np.where(good, 1.0 / noise**2, 0.0)
    truth = {"sigma": sigma, "v_star": v_star, "z": z, "line_flux": line_flux, "gas_sigma": gas_sigma}
    return wave, flux.astype(np.float32), ivar.astype(np.float32), lsf, truth


def synthetic_sample(template_path: Path | str, n: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` spectra of ``synthetic_batch`` spanning the layer's range, for benches: (wave, flux, ivar, lsf, z, sigma).

    z 0.02-0.45, sigma 70-300 km/s, S/N 8-40 per pixel, and the 12 lines in fixed
    star-forming ratios scaled by 0.2-1.5 (uniform draws from ``seed``).
    """
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.02, 0.45, n)
    sigma = rng.uniform(70, 300, n)
    base = np.array([0.6, 0.8, 0.26, 0.47, 1.0, 0.5, 1.5, 0.35, 2.86, 1.0, 0.45, 0.35])
    lines = 30 * base[None, :] * rng.uniform(0.2, 1.5, (n, 1))
    wave, flux, ivar, lsf, _ = synthetic_batch(template_path, z, sigma, rng.uniform(8, 40, n), lines, seed=seed)
    return wave, flux, ivar, lsf, z, sigma

