"""Amortized posteriors for every galaxy: a mixture-density network trained on the Swiss Army model.

Training set: parameters drawn from the same priors as the Bagpipes fits
(``pipes_model.sample_prior``), noiseless spectra from bagpipes' own
``model_galaxy`` (same BC03 grids, Calzetti dust, nebular emission,
resolution, velocity broadening) on the same 8 A bins as the fits, redshift
uniform in [Z_MIN, Z_MAX]. The calibration polynomial (its prior,
``pipes_model.sample_calibration``) and DESI-like noise
(``pipes_sim.add_noise``; S/N per native pixel log-uniform in [SNR_MIN,
SNR_MAX]) are drawn afresh every ``renoise_every`` epochs (:func:`realise`):
the network sees each model spectrum under many noise and calibration draws,
so it learns the posterior rather than the noise of a fixed training set.
That, and 80,000 model spectra, is what makes it sharp at high S/N (the
LogMass 68 % width at S/N > 10 is 0.19 dex; it was 0.32 with 6000 noisy
spectra drawn once; bench/RESULTS.md).

Model error: bagpipes' physics is not nature's. Besides its statistical
posterior (calibrated on held-out simulations of its own model), the
estimator carries a per-quantity ``model_error``: a Gaussian sigma added in
quadrature to every mixture component, fitted so that 68 % intervals cover
68 % of the truths of an independent forward model: prior-drawn mock surveys
(``ard mock --physics prior``: another SSP code, Kennicutt & Evans line
luminosities, no nebular continuum) through DESI files and the ingest
(:meth:`AmortizedEstimator.fit_model_error`; the layer's ``prepare``).
Reported percentiles include it (all three are quantiles of the widened
mixture, so a two-peaked posterior's median can move toward the middle); it is
the difference between two honest models of a galaxy, so on real spectra it
is a floor, not a bound.

Compression: the binned spectrum divided by its median (masked bins filled
by interpolation) is projected on a PCA basis fitted to the training set;
with log10(median flux), z, log10(S/N) and log10 L (the median flux as a
rest-frame luminosity, bagpipes' cosmology) it is the network input.
LogMass and log SFR are modelled relative to log10 L (a mass-to-light-like
offset), then shifted back, so the mass scale comes from the flux calibration
and the distance exactly, not from the network's arithmetic.

Posterior: for each reported quantity an independent 1-D Gaussian mixture
(the marginal posterior, which is what p16/p50/p84 summarise). Quantities are
modelled in a transformed space (log for SFR, Metallicity, Tau; SFR floored
at 1e-5 Msun/yr and sSFR at 1e-15 /yr, since the model's SFR can be
arbitrarily close to 0 and only "below the floor" is measurable).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ard_sql.science import pipes_model as pm
from ard_sql.science.pipes_fit import FLAGS, MIN_GOOD_BINS, PERCENTILES, QUANTITIES, null_row

Z_MIN, Z_MAX = 0.02, 1.0
#: S/N per native pixel of the training spectra; the brightest DESI galaxies the daemon fits
#: first reach 20-40.
SNR_MIN, SNR_MAX = 0.5, 60.0
VELDISP_RANGE = (50.0, 350.0)
LOG_SFR_FLOOR, SSFR_FLOOR = math.log10(pm.SFR_FLOOR), pm.SSFR_FLOOR
_LOG_QUANTITIES = {"SFR", "Metallicity", "Tau"}
#: Bump when the network's inputs or targets change (invalidates cached estimators).
FEATURE_VERSION = 5  # 5: the S/N input capped at SNR_MAX
#: Layout of the estimator file (:meth:`AmortizedEstimator.save`); part of the cache key, so files of
#: another layout are never picked from a cache. 2: arrays as tensors, loadable with weights_only=True.
FILE_FORMAT = 2
#: How posteriors are read from the network (part of the cache key: the model error is fitted on them).
#: 2: truncated to the physical support (:func:`physical_support`), the model error bisected on that.
POSTERIOR_VERSION = 2


@dataclass(frozen=True)
class AmortizedConfig:
    """Size of the training set and of the network."""

    n_sims: int = 80000
    """Noiseless model spectra (about 17 ms each on one core)."""
    n_pca: int = 48
    """PCA components of the normalised spectrum."""
    hidden: int = 128
    n_components: int = 4
    """Gaussians per marginal posterior."""
    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0
    renoise_every: int = 2
    """Epochs between fresh draws of noise, S/N and calibration polynomial for the training spectra."""


# ------------------------------------------------------------------ simulation
_SIMULATOR = None  # one bagpipes model per process, reused by every chunk it computes


def _simulate_chunk(args: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    global _SIMULATOR
    from ard_sql.science.pipes_sim import Simulator

    if _SIMULATOR is None:
        _SIMULATOR = Simulator()
    theta, z, veldisp = args
    flux, truth = _SIMULATOR.spectra(theta, z, veldisp)
    return flux.astype(np.float32), truth


def simulate_training_set(n: int, seed: int = 0, progress: bool = False, workers: int = 1
                          ) -> dict[str, np.ndarray]:
    """Draw ``n`` (parameters, noiseless binned model spectrum) pairs from the forward model.

    Returns ``model_flux`` (n, nbin) float32 in 1e-17 erg/s/cm2/A, ``z``,
    ``veldisp`` and ``truth_<quantity>``; :func:`realise` adds calibration and
    noise. Every parameter is drawn up front from ``seed``, so the set does not
    depend on ``workers`` (processes computing spectra, each with its own
    bagpipes model).
    """
    rng = np.random.default_rng(seed)
    z = rng.uniform(Z_MIN, Z_MAX, n)
    theta = pm.sample_prior(n, z, rng)
    veldisp = rng.uniform(*VELDISP_RANGE, n)
    step = 500
    chunks = [(theta[i:i + step], z[i:i + step], veldisp[i:i + step]) for i in range(0, n, step)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="simulating", unit="spectra")
    parallel = workers > 1 and len(chunks) > 1
    # spawn: the parent may hold torch/dask threads that a fork would copy half-alive
    with (ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if parallel
          else contextlib.nullcontext()) as pool:
        results = []
        for r, c in zip((pool.map if parallel else map)(_simulate_chunk, chunks), chunks):
            results.append(r)
            if bar is not None:
                bar.update(len(c[1]))
    if bar is not None:
        bar.close()
    flux = np.concatenate([r[0] for r in results]) if results else np.empty((0, pm.fit_wavelengths().size), np.float32)
    truth = {q: np.concatenate([r[1][q] for r in results]) if results else np.empty(0) for q in QUANTITIES}
    return {"model_flux": flux, "z": z, "veldisp": veldisp, **{f"truth_{q}": truth[q] for q in QUANTITIES}}


def realise(sims: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One observed version of simulated model spectra: calibration polynomial, S/N and noise drawn from ``rng``.

    Returns ``flux``, ``ivar`` (float32) and ``snr`` (median S/N per native pixel).
    """
    from ard_sql.science.pipes_sim import add_noise

    model = np.asarray(sims["model_flux"], np.float32)
    n = len(model)
    wave = pm.fit_wavelengths()
    calib = pm.sample_calibration(n, rng)
    flux = model / pm.calibration_curve(wave, calib).astype(np.float32)
    snr = 10 ** rng.uniform(np.log10(SNR_MIN), np.log10(SNR_MAX), n)
    noisy, ivar = add_noise(flux, wave, snr, rng, pixels_per_bin=pm.FIT_BIN)
    return {"flux": noisy, "ivar": ivar, "snr": snr}


# ------------------------------------------------------------------ features / targets
#: Quantities modelled relative to the spectrum's luminosity (log10 L at the median flux):
#: the network predicts M/L-like offsets, which span a far smaller range than M itself.
ANCHORED = ("LogMass", "SFR")
_L_SUN_ERG_S = 3.828e33


def _log_dl_table() -> tuple[np.ndarray, np.ndarray]:
    from astropy.cosmology import FlatLambdaCDM

    zz = np.linspace(1e-4, 3.0, 3000)
    dl_cm = FlatLambdaCDM(H0=70.0, Om0=0.3).luminosity_distance(zz).to_value("cm")
    return zz, np.log10(dl_cm)


_DL = _log_dl_table()


def log_luminosity(scale: np.ndarray, z: np.ndarray) -> np.ndarray:
    """log10 rest-frame L_lambda (L_sun/A) of observed flux ``scale`` (1e-17 erg/s/cm2/A) at ``z``.

    bagpipes' cosmology (H0 = 70, Om = 0.3): L = f 4 pi D_L^2 (1 + z).
    """
    z = np.asarray(z, float)
    log_dl = np.interp(z, *_DL)
    return (np.log10(np.maximum(np.asarray(scale, float), 1e-30)) - 17.0 + np.log10(4 * np.pi) + 2 * log_dl
            + np.log10(1 + z) - np.log10(_L_SUN_ERG_S))


def binned_snr(flux: np.ndarray, ivar: np.ndarray, median=np.nanmedian) -> np.ndarray:
    """Median S/N per native pixel of binned spectra (the network's S/N input); NaN without a good bin."""
    flux, ivar = np.atleast_2d(np.asarray(flux)), np.atleast_2d(np.asarray(ivar))
    good = (ivar > 0) & np.isfinite(flux)
    out = np.full(len(flux), np.nan)
    some = good.any(axis=1)
    with np.errstate(invalid="ignore"):
        per_bin = np.where(good[some], np.abs(flux[some]) * np.sqrt(np.where(good[some], ivar[some], 0)), np.nan)
    out[some] = median(per_bin, axis=1) / np.sqrt(pm.FIT_BIN)
    return out


def features(flux: np.ndarray, ivar: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised spectrum (n, nbin), scalars (n, 4)) of binned inputs.

    Scalars: log10 median |flux|, z, log10 S/N per native pixel, log10 luminosity
    (:func:`log_luminosity` of the median flux; the anchor of :data:`ANCHORED`).
    """
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    good = (ivar > 0) & np.isfinite(flux)
    if good.all():  # simulations: no masked bin, so float32 and plain medians (5x faster than nanmedian)
        flux, ivar = flux.astype(np.float32, copy=False), ivar.astype(np.float32, copy=False)
        filled, median = flux, np.median
    else:
        flux, ivar = flux.astype(np.float64), ivar.astype(np.float64)
        x = np.arange(flux.shape[1])
        filled = np.where(good, flux, 0.0)
        for i in np.flatnonzero(~good.all(axis=1)):  # interpolate over masked bins (rare rows)
            g = good[i]
            if g.sum() >= 2:
                filled[i] = np.interp(x, x[g], flux[i, g])
        median = np.nanmedian
    scale = median(np.where(good, np.abs(flux), np.nan), axis=1)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    snr = binned_snr(flux, ivar, median)
    # above the simulated range the network is told SNR_MAX: the posterior of a noisier spectrum (wider
    # than the data allow, never narrower) rather than an extrapolation; below it predict_rows gives NULL
    snr = np.minimum(np.where(np.isfinite(snr) & (snr > 0), snr, SNR_MIN), SNR_MAX)
    spec = np.clip(filled / scale[:, None], -5.0, 10.0)
    scalars = np.column_stack([np.log10(scale), np.asarray(z, float), np.log10(snr), log_luminosity(scale, z)])
    return spec.astype(np.float32), scalars.astype(np.float32)


def _anchor_columns() -> list[int]:
    return [QUANTITIES.index(q) for q in ANCHORED]


def to_target_space(truth: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 8) quantities in the space the network models (log where said, floors applied)."""
    cols = []
    for q in QUANTITIES:
        v = np.asarray(truth[q], float)
        if q == "SFR":
            v = np.log10(pm.floor_sfr(v))
        elif q == "sSFR":
            v = pm.floor_ssfr(v)
        elif q in _LOG_QUANTITIES:
            v = np.log10(v)
        cols.append(v)
    return np.column_stack(cols)


def from_target_space(q: str, v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_target_space` for one quantity (monotonic, so percentiles map)."""
    return 10**v if q in _LOG_QUANTITIES else v


# ------------------------------------------------------------------ the network
class MarginalMDN(nn.Module):
    """MLP -> an independent Gaussian mixture per quantity."""

    def __init__(self, n_in: int, n_out: int, hidden: int, n_components: int) -> None:
        super().__init__()
        self.n_out, self.k = n_out, n_components
        self.body = nn.Sequential(
            nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
        )
        self.head = nn.Linear(hidden, n_out * n_components * 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (log weights, means, sigmas), each (n, n_out, k)."""
        h = self.head(self.body(x)).view(-1, self.n_out, 3, self.k)
        logw = torch.log_softmax(h[:, :, 0], dim=-1)
        sigma = nn.functional.softplus(h[:, :, 2]) + 1e-3
        return logw, h[:, :, 1], sigma

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of targets ``y`` (n, n_out), summed over quantities."""
        logw, mu, sigma = self(x)
        logp = torch.distributions.Normal(mu, sigma).log_prob(y[:, :, None]) + logw
        return -torch.logsumexp(logp, dim=-1).sum(dim=1).mean()


def mixture_cdf(logw: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """CDF of 1-D Gaussian mixtures (n, n_out, k) at ``x`` (n, n_out, m) -> (n, n_out, m); +-inf allowed."""
    w = logw.exp()[..., None, :]
    z = (x[..., None] - mu[..., None, :]) / (sigma[..., None, :] * math.sqrt(2))
    return (w * (0.5 + 0.5 * torch.erf(z))).sum(-1)


def physical_support(z: np.ndarray) -> np.ndarray:
    """(n, 8, 2) bounds of each reported quantity in target space (-inf / inf where open).

    The model-error term widens the network's Gaussians, which then reach values no galaxy can
    have (a negative age or A_V, Tau or Metallicity outside their priors); the posterior is
    conditioned on this support (truncated, not clipped) before its quantiles are read.
    """
    n = len(z)
    out = np.empty((n, len(QUANTITIES), 2))
    out[..., 0], out[..., 1] = -np.inf, np.inf
    prior = {p.name: p for p in pm.PRIORS}
    out[:, QUANTITIES.index("Age"), 0] = 0.0
    out[:, QUANTITIES.index("Age"), 1] = pm.age_of_universe(np.asarray(z, float))
    out[:, QUANTITIES.index("Dust_Av")] = (prior["Av"].low, prior["Av"].high)
    for q, name in (("Tau", "tau"), ("Metallicity", "metallicity")):
        out[:, QUANTITIES.index(q)] = (np.log10(prior[name].low), np.log10(prior[name].high))
    return out


def truncated_quantiles(logw: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, support: torch.Tensor,
                        probs: tuple[float, ...]) -> torch.Tensor:
    """Quantiles of the mixtures conditioned on ``support`` (n, n_out, 2): p -> F(lo) + p (F(hi) - F(lo))."""
    f = mixture_cdf(logw, mu, sigma, support)
    mass = (f[..., 1:2] - f[..., 0:1]).clamp_min(1e-6)
    return mixture_quantiles(logw, mu, sigma, f[..., 0:1] + torch.tensor(tuple(probs), dtype=mu.dtype) * mass)


def mixture_quantiles(logw: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                      probs: tuple[float, ...] | torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Quantiles of 1-D Gaussian mixtures by vectorised bisection -> (n, n_out, len(probs)).

    Every quantile is bisected at once; 30 halvings of a bracket of ~12 sigma
    leave an error below 1e-8 sigma.
    """
    # (P,), or per row and quantity (n, q, P): the probabilities of a truncated posterior
    p = probs.to(mu.dtype) if isinstance(probs, torch.Tensor) else torch.tensor(probs, dtype=mu.dtype)
    a = (mu - 6 * sigma).min(dim=-1).values[..., None].expand(*mu.shape[:-1], p.shape[-1]).clone()
    b = (mu + 6 * sigma).max(dim=-1).values[..., None].expand(*mu.shape[:-1], p.shape[-1]).clone()
    for _ in range(iters):
        mid = 0.5 * (a + b)
        below = mixture_cdf(logw, mu, sigma, mid) < p
        a = torch.where(below, mid, a)
        b = torch.where(below, b, mid)
    return 0.5 * (a + b)


def calibrate_widths(logw: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor,
                     level: float = 0.6827, iters: int = 25) -> np.ndarray:
    """Per-quantity factor on the mixture widths that makes the central ``level`` interval cover ``level``.

    Bisection in log(factor) on held-out (validation) simulations; coverage
    grows monotonically with the factor. Returns (n_out,) factors in [1/4, 4].
    """
    lo = torch.full((mu.shape[1],), math.log(0.25))
    hi = torch.full((mu.shape[1],), math.log(4.0))
    tail = (1 - level) / 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        q = mixture_quantiles(logw, mu, sigma * mid.exp()[None, :, None], (tail, 1 - tail))
        cov = ((y >= q[..., 0]) & (y <= q[..., 1])).float().mean(0)
        lo = torch.where(cov < level, mid, lo)
        hi = torch.where(cov < level, hi, mid)
    return (0.5 * (lo + hi)).exp().numpy()


def truth_in_target_space(truth: dict[str, np.ndarray], n: int) -> np.ndarray:
    """(n, 8) target-space truths; quantities missing from ``truth`` are NaN."""
    return to_target_space({q: np.asarray(truth[q], float) if q in truth else np.full(n, np.nan) for q in QUANTITIES})


#: Coverage the model error is fitted to: that of the stored p16-p84 interval.
MODEL_ERROR_LEVEL = (PERCENTILES[-1] - PERCENTILES[0]) / 100
#: The estimator's array fields, stored as tensors in its file (sigma_scale, model_error may be None).
_ARRAYS = ("pca_mean", "pca_basis", "x_mean", "x_std", "y_mean", "y_std", "sigma_scale", "model_error")


@dataclass
class AmortizedEstimator:
    """A trained estimator: PCA basis, input/target standardisation and the network."""

    config: AmortizedConfig
    pca_mean: np.ndarray
    pca_basis: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    net: MarginalMDN
    sigma_scale: np.ndarray | None = None
    """(8,) width factor per quantity, fitted on the validation split so 68 % intervals cover 68 %."""
    model_error: np.ndarray | None = None
    """(8,) sigma added in quadrature for the model's own error (:meth:`fit_model_error`); None: none."""

    # ---------------------------------------------------------- training
    def _inputs(self, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Standardised network input and the scalars (for the anchor) of binned spectra."""
        spec, scal = features(flux, ivar, z)
        x = np.hstack([(spec - self.pca_mean) @ self.pca_basis.T, scal])
        return torch.from_numpy(((x - self.x_mean) / self.x_std).astype(np.float32)), scal

    def _targets(self, y: np.ndarray, scal: np.ndarray) -> torch.Tensor:
        """Standardised targets: target-space quantities (n, 8), the anchored ones relative to log L."""
        y = np.array(y, np.float64)
        y[:, _anchor_columns()] -= scal[:, 3:4].astype(np.float64)
        return torch.from_numpy(((y - self.y_mean) / self.y_std).astype(np.float32))

    @classmethod
    def train(cls, sims: dict[str, np.ndarray], config: AmortizedConfig = AmortizedConfig(),
              log: Callable[[str], object] | None = None) -> "AmortizedEstimator":
        """Fit PCA + the MDN on noiseless simulations (:func:`simulate_training_set`).

        The first 10 % are the validation split, realised once; the rest get a
        fresh :func:`realise` every ``config.renoise_every`` epochs.
        """
        torch.manual_seed(config.seed)
        rng = np.random.default_rng([config.seed, 1])
        n = len(sims["z"])
        n_val = max(1, n // 10)
        y_all = to_target_space({q: sims[f"truth_{q}"] for q in QUANTITIES})
        first = realise(sims, rng)
        spec, scal = features(first["flux"], first["ivar"], sims["z"])
        pca_mean = spec.mean(axis=0)
        _, _, vt = np.linalg.svd(spec[:6000] - pca_mean, full_matrices=False)
        basis = vt[: config.n_pca].astype(np.float32)
        x = np.hstack([(spec - pca_mean) @ basis.T, scal]).astype(np.float32)
        y = y_all.copy()
        y[:, _anchor_columns()] -= scal[:, 3:4].astype(np.float64)
        est = cls(config, pca_mean, basis, x.mean(0), x.std(0) + 1e-6, y.mean(0), y.std(0) + 1e-6,
                  MarginalMDN(x.shape[1], y.shape[1], config.hidden, config.n_components))
        del spec, x
        xv, _ = est._inputs(first["flux"][:n_val], first["ivar"][:n_val], sims["z"][:n_val])
        yv = est._targets(y_all[:n_val], scal[:n_val])
        train_part = {k: v[n_val:] for k, v in sims.items()}
        net = est.net
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
        gen = torch.Generator().manual_seed(config.seed)
        best, best_state = np.inf, None
        xt = yt = None
        for epoch in range(config.epochs):
            if epoch % max(1, config.renoise_every) == 0:
                obs = realise(train_part, rng)
                xt, sc = est._inputs(obs["flux"], obs["ivar"], train_part["z"])
                yt = est._targets(y_all[n_val:], sc)
            net.train()
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(perm), config.batch_size):
                idx = perm[i:i + config.batch_size]
                opt.zero_grad()
                loss = net.nll(xt[idx], yt[idx])
                loss.backward()
                opt.step()
            sched.step()
            net.eval()
            with torch.no_grad():
                val = float(net.nll(xv, yv))
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
            if log:
                log(f"epoch {epoch + 1}/{config.epochs} val nll {val:.3f}")
        net.load_state_dict(best_state)
        net.eval()
        with torch.no_grad():
            est.sigma_scale = calibrate_widths(*net(xv), yv)
        if log:
            log(f"width calibration factors {np.round(est.sigma_scale, 3).tolist()}")
        return est

    def _mixtures(self, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray, model_error: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """(log weights, means, sigmas) in standardised target space, and the scalars."""
        xt, scal = self._inputs(flux, ivar, z)
        with torch.no_grad():
            logw, mu, sigma = self.net(xt)
        if self.sigma_scale is not None:
            sigma = sigma * torch.from_numpy(np.asarray(self.sigma_scale, np.float32))[None, :, None]
        if model_error and self.model_error is not None:
            extra = torch.from_numpy((np.asarray(self.model_error) / self.y_std).astype(np.float32))
            sigma = torch.sqrt(sigma**2 + extra[None, :, None] ** 2)
        return logw, mu, sigma, scal

    def fit_model_error(self, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray,
                        truth: dict[str, np.ndarray], level: float = MODEL_ERROR_LEVEL, iters: int = 30) -> np.ndarray:
        """Fit :attr:`model_error` on spectra of another forward model with known ``truth``.

        Per quantity (those in ``truth`` with finite values), the smallest sigma
        (target-space units: dex for LogMass/SFR/sSFR/Metallicity/Tau, Gyr for
        Age and t_quench, mag for Dust_Av) that, added in quadrature to every
        mixture component, makes the central ``level`` interval cover ``level``
        of the truths; 0 where the statistical posterior already does.
        Returns and stores the (8,) vector.
        """
        logw, mu, sigma, scal = self._mixtures(flux, ivar, z, model_error=False)
        n = len(scal)
        y = self._targets(truth_in_target_space(truth, n), scal)
        tail = (1 - level) / 2
        out = np.zeros(len(QUANTITIES))
        # the reported intervals are those of the posterior truncated to the physical support
        # (quantiles_binned), so the coverage is bisected on the same truncated intervals
        support = torch.from_numpy(physical_support(np.asarray(z, float)).astype(np.float32))
        support = (support - torch.as_tensor(self.y_mean, dtype=torch.float32)[None, :, None]) \
            / torch.as_tensor(self.y_std, dtype=torch.float32)[None, :, None]  # bounded quantities are not anchored
        for j in range(len(QUANTITIES)):
            ok = torch.isfinite(y[:, j])
            if int(ok.sum()) < 20:
                continue

            def coverage_with(extra: float) -> float:
                s = torch.sqrt(sigma[ok, j:j + 1] ** 2 + extra**2)
                q = truncated_quantiles(logw[ok, j:j + 1], mu[ok, j:j + 1], s, support[ok, j:j + 1],
                                        (tail, 1 - tail))[:, 0]
                return float(((y[ok, j] >= q[:, 0]) & (y[ok, j] <= q[:, 1])).float().mean())

            if coverage_with(0.0) >= level:
                continue
            # Truncated to a bounded support, coverage need not grow with the added width (widening
            # near a bound also moves the interval): scan a grid (standardised units; 4 target sds is
            # more than any prior width), take the first width that reaches the level, else the best,
            # then refine by bisection inside the grid step where it was first reached.
            grid = np.concatenate([[0.0], np.geomspace(0.01, 4.0, 40)])
            cov = np.array([coverage_with(float(g)) for g in grid])
            reached = np.flatnonzero(cov >= level)
            if reached.size == 0:
                out[j] = float(grid[int(np.argmax(cov))]) * float(self.y_std[j])
                continue
            lo, hi = float(grid[reached[0] - 1]), float(grid[reached[0]])
            for _ in range(min(iters, 12)):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if coverage_with(mid) < level else (lo, mid)
            out[j] = hi * float(self.y_std[j])
        self.model_error = out
        return out

    # ---------------------------------------------------------- inference
    def quantiles_binned(self, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray,
                         probs: tuple[float, ...], model_error: bool = True) -> np.ndarray:
        """(n, 8, len(probs)) marginal posterior quantiles in the reported units, from binned spectra.

        ``model_error=False`` gives the statistical posterior alone (what held-out
        simulations of the model itself calibrate).
        """
        logw, mu, sigma, scal = self._mixtures(flux, ivar, z, model_error)
        with torch.no_grad():
            ym, ys = torch.from_numpy(np.asarray(self.y_mean, np.float32)), torch.from_numpy(np.asarray(self.y_std, np.float32))
            mu_t, sd_t = mu * ys[None, :, None] + ym[None, :, None], sigma * ys[None, :, None]
            # conditioned on the physical support (no bounded quantity is anchored)
            support = torch.from_numpy(physical_support(np.asarray(z, float)).astype(np.float32))
            q = truncated_quantiles(logw, mu_t, sd_t, support, tuple(probs))
            lo, hi = support[..., 0:1], support[..., 1:2]
            q = torch.minimum(torch.maximum(q, lo), hi)  # a posterior (almost) wholly outside: its edge
        q = q.numpy().astype(np.float64)
        q[:, _anchor_columns(), :] += scal[:, 3].astype(np.float64)[:, None, None]
        # the targets were floored, the model-error-widened mixtures are not: max(x, floor) is monotone, so these
        # are the quantiles of the floored quantity
        q[:, QUANTITIES.index("SFR")] = np.maximum(q[:, QUANTITIES.index("SFR")], LOG_SFR_FLOOR)
        q[:, QUANTITIES.index("sSFR")] = np.maximum(q[:, QUANTITIES.index("sSFR")], SSFR_FLOOR)
        for j, name in enumerate(QUANTITIES):
            q[:, j] = from_target_space(name, q[:, j])
        return q

    def percentiles_binned(self, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray,
                           model_error: bool = True) -> np.ndarray:
        """(n, 8, 3) p16/p50/p84 in the reported units, from binned spectra."""
        return self.quantiles_binned(flux, ivar, z, tuple(p / 100 for p in PERCENTILES), model_error)

    def predict_rows(self, targetid: np.ndarray, z: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> list[dict]:
        """Contract rows (Physics_Source='amortized') for brz-grid spectra; unusable ones NULL + flag."""
        targetid = np.asarray(targetid, np.int64)
        z = np.asarray(z, float)
        bflux, bivar = pm.bin_spectra(flux, ivar)
        flags = np.zeros(len(targetid), np.int64)
        flags[(bivar > 0).sum(axis=1) < MIN_GOOD_BINS] |= FLAGS["NO_DATA"]
        flags[~np.isfinite(z) | (z <= 0)] |= FLAGS["BAD_REDSHIFT"]
        flags[np.isfinite(z) & (z > 0) & ((z < Z_MIN) | (z > Z_MAX))] |= FLAGS["OUT_OF_TRAINING"]
        # fainter than any simulation (the noise-only median |flux| / sigma alone gives ~0.2): no posterior
        flags[(flags & FLAGS["NO_DATA"] == 0) & (binned_snr(bflux, bivar) < SNR_MIN)] |= FLAGS["OUT_OF_TRAINING"]
        ok = flags == 0
        rows = [null_row(t, f, "amortized") for t, f in zip(targetid, flags)]
        if ok.any():
            q = self.percentiles_binned(bflux[ok], bivar[ok], z[ok])
            for r, i in enumerate(np.flatnonzero(ok)):
                for j, name in enumerate(QUANTITIES):
                    for k, p in enumerate(PERCENTILES):
                        rows[i][f"{name}_p{p}"] = float(q[r, j, k])
        return rows

    # ---------------------------------------------------------- persistence
    def save(self, path: Path | str) -> Path:
        """Write the estimator (one torch file) atomically.

        Only tensors, strings, numbers, lists, dicts and None go in (arrays as tensors, same dtype), so
        that :meth:`load` can read it with ``weights_only=True``: the file may sit in a shared cache.
        """
        from ard_sql import paths

        def tensor(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.array(a))  # a copy: same dtype, writable

        path = Path(path)
        with paths.atomic_path(path) as tmp:
            torch.save({"format": FILE_FORMAT, "config": asdict(self.config),
                        **{k: tensor(getattr(self, k)) for k in _ARRAYS},
                        "state": self.net.state_dict(), "quantities": list(QUANTITIES),
                        "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, tmp)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "AmortizedEstimator":
        """Read an estimator written by :meth:`save` (tensors and plain data only: ``weights_only=True``)."""
        import pickle

        try:
            blob = torch.load(Path(path), weights_only=True)
        except pickle.UnpicklingError as exc:
            # an estimator of the older layout (numpy arrays pickled): not loaded unsafely, retrained instead
            raise ValueError(f"{path}: not an estimator file of format {FILE_FORMAT} (written by an older "
                             "version?); delete it and rerun `ard build --layers bagpipes` to retrain") from exc
        if blob.get("format") != FILE_FORMAT:
            raise ValueError(f"{path}: estimator file format {blob.get('format')}, expected {FILE_FORMAT}; "
                             "rerun `ard build --layers bagpipes` to retrain")
        if blob["quantities"] != list(QUANTITIES):
            raise ValueError(f"{path}: estimator quantities {blob['quantities']} differ from {list(QUANTITIES)}")
        config = AmortizedConfig(**blob["config"])
        net = MarginalMDN(len(blob["x_mean"]), len(QUANTITIES), config.hidden, config.n_components)
        net.load_state_dict(blob["state"])
        net.eval()
        arrays = {k: None if blob.get(k) is None else blob[k].numpy() for k in _ARRAYS}
        return cls(config, net=net, **arrays)


def config_fingerprint(config: AmortizedConfig) -> str:
    """A short string identifying the training configuration (cache key for checkpoints)."""
    import hashlib

    blob = json.dumps({"features": FEATURE_VERSION, "file_format": FILE_FORMAT, "posterior": POSTERIOR_VERSION,
                       "config": asdict(config), "priors": [asdict(p) for p in pm.PRIORS],
                       "calib": [pm.CALIB_MU, pm.CALIB_SIGMA, pm.CALIB_BOUND], "bin": pm.FIT_BIN,
                       "z": [Z_MIN, Z_MAX], "snr": [SNR_MIN, SNR_MAX]}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def coverage(rows_or_q: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of galaxies whose [p16, p84] interval contains the truth, per quantity.

    ``rows_or_q`` is the (n, 8, 3) output of :meth:`AmortizedEstimator.percentiles_binned`.
    Floors are applied to the truth the same way as in training; quantities
    missing from ``truth`` are left out.
    """
    n = len(rows_or_q)
    t = truth_in_target_space(truth, n)
    out = {}
    for j, q in enumerate(QUANTITIES):
        if q not in truth:
            continue
        lo = rows_or_q[:, j, 0]
        hi = rows_or_q[:, j, 2]
        tv = from_target_space(q, t[:, j])
        out[q] = float(np.mean((tv >= lo) & (tv <= hi)))
    return out
