"""Amortized posteriors for every galaxy: a mixture-density network trained on the Swiss Army model.

Training set: parameters drawn from the same priors as the Bagpipes fits
(``pipes_model.sample_prior``, calibration coefficients included), spectra
from bagpipes' own ``model_galaxy`` (same BC03 grids, Calzetti dust, nebular
emission, resolution, velocity broadening), on the same 8 A bins as the fits,
with DESI-like noise (``pipes_sim.add_noise``; S/N per native pixel
log-uniform in [SNR_MIN, SNR_MAX]) and redshift uniform in [Z_MIN, Z_MAX].

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

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ard_sql.science import pipes_model as pm
from ard_sql.science.pipes_fit import FLAGS, MIN_GOOD_BINS, PERCENTILES, QUANTITIES, null_row

Z_MIN, Z_MAX = 0.02, 1.0
SNR_MIN, SNR_MAX = 0.5, 20.0
VELDISP_RANGE = (50.0, 350.0)
LOG_SFR_FLOOR, SSFR_FLOOR = -5.0, -15.0
_LOG_QUANTITIES = {"SFR", "Metallicity", "Tau"}
#: Bump when the network's inputs or targets change (invalidates cached estimators).
FEATURE_VERSION = 3


@dataclass(frozen=True)
class AmortizedConfig:
    """Size of the training set and of the network."""

    n_sims: int = 12000
    """Simulated spectra (about 15 ms each on one core)."""
    n_pca: int = 48
    """PCA components of the normalised spectrum."""
    hidden: int = 128
    n_components: int = 4
    """Gaussians per marginal posterior."""
    epochs: int = 60
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0


# ------------------------------------------------------------------ simulation
def simulate_training_set(n: int, seed: int = 0, progress: bool = False) -> dict[str, np.ndarray]:
    """Draw ``n`` (parameters, noisy binned spectrum) pairs from the forward model."""
    from ard_sql.science.pipes_sim import Simulator, add_noise

    rng = np.random.default_rng(seed)
    z = rng.uniform(Z_MIN, Z_MAX, n)
    theta = pm.sample_prior(n, z, rng)
    calib = pm.sample_calibration(n, rng)
    veldisp = rng.uniform(*VELDISP_RANGE, n)
    snr = 10 ** rng.uniform(np.log10(SNR_MIN), np.log10(SNR_MAX), n)
    sim = Simulator()
    flux = np.empty((n, sim.wave.size), np.float32)
    truth = {q: np.empty(n) for q in QUANTITIES}
    step = 500
    it = range(0, n, step)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="simulating", unit_scale=step)
    for i0 in it:
        sl = slice(i0, min(n, i0 + step))
        f, t = sim.spectra(theta[sl], z[sl], veldisp[sl])
        f = f / pm.calibration_curve(sim.wave, calib[sl])
        flux[sl] = f
        for q in QUANTITIES:
            truth[q][sl] = t[q]
    noisy, ivar = add_noise(flux, sim.wave, snr, rng, pixels_per_bin=pm.FIT_BIN)
    return {"flux": noisy.astype(np.float32), "ivar": ivar.astype(np.float32), "z": z, "snr": snr,
            **{f"truth_{q}": truth[q] for q in QUANTITIES}}


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


def features(flux: np.ndarray, ivar: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised spectrum (n, nbin), scalars (n, 4)) of binned inputs.

    Scalars: log10 median |flux|, z, log10 S/N per native pixel, log10 luminosity
    (:func:`log_luminosity` of the median flux; the anchor of :data:`ANCHORED`).
    """
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, np.float64))
    good = (ivar > 0) & np.isfinite(flux)
    n, m = flux.shape
    x = np.arange(m)
    filled = np.where(good, flux, 0.0)
    for i in np.flatnonzero(~good.all(axis=1)):  # interpolate over masked bins (rare rows)
        g = good[i]
        if g.sum() >= 2:
            filled[i] = np.interp(x, x[g], flux[i, g])
    masked = np.where(good, flux, np.nan)
    scale = np.nanmedian(np.abs(masked), axis=1)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    snr = np.nanmedian(np.where(good, np.abs(flux) * np.sqrt(ivar), np.nan), axis=1) / np.sqrt(pm.FIT_BIN)
    snr = np.where(np.isfinite(snr) & (snr > 0), snr, SNR_MIN)
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
            v = np.maximum(np.log10(np.maximum(v, 1e-300)), LOG_SFR_FLOOR)
        elif q == "sSFR":
            v = np.maximum(np.nan_to_num(v, nan=SSFR_FLOOR, neginf=SSFR_FLOOR), SSFR_FLOOR)
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


def mixture_quantiles(logw: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                      probs: tuple[float, ...], iters: int = 30) -> torch.Tensor:
    """Quantiles of 1-D Gaussian mixtures by vectorised bisection -> (n, n_out, len(probs)).

    Every quantile is bisected at once; 30 halvings of a bracket of ~12 sigma
    leave an error below 1e-8 sigma.
    """
    w = logw.exp()[..., None, :]                      # (n, q, 1, k)
    m, s = mu[..., None, :], sigma[..., None, :] * math.sqrt(2)
    p = torch.tensor(probs, dtype=mu.dtype)           # (P,)
    a = (mu - 6 * sigma).min(dim=-1).values[..., None].expand(*mu.shape[:-1], len(probs)).clone()
    b = (mu + 6 * sigma).max(dim=-1).values[..., None].expand(*mu.shape[:-1], len(probs)).clone()
    for _ in range(iters):
        mid = 0.5 * (a + b)
        cdf = (w * (0.5 + 0.5 * torch.erf((mid[..., None] - m) / s))).sum(-1)
        below = cdf < p
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

    # ---------------------------------------------------------- training
    @classmethod
    def train(cls, sims: dict[str, np.ndarray], config: AmortizedConfig = AmortizedConfig(),
              log: callable | None = None) -> "AmortizedEstimator":
        """Fit PCA + the MDN on a simulated training set (``simulate_training_set``)."""
        torch.manual_seed(config.seed)
        spec, scal = features(sims["flux"], sims["ivar"], sims["z"])
        pca_mean = spec.mean(axis=0)
        _, _, vt = np.linalg.svd(spec[:4000] - pca_mean, full_matrices=False)
        basis = vt[: config.n_pca].astype(np.float32)
        x = np.hstack([(spec - pca_mean) @ basis.T, scal]).astype(np.float32)
        y = to_target_space({q: sims[f"truth_{q}"] for q in QUANTITIES})
        y[:, _anchor_columns()] -= scal[:, 3:4].astype(np.float64)
        y = y.astype(np.float32)
        x_mean, x_std = x.mean(0), x.std(0) + 1e-6
        y_mean, y_std = y.mean(0), y.std(0) + 1e-6
        xt = torch.from_numpy((x - x_mean) / x_std)
        yt = torch.from_numpy((y - y_mean) / y_std)
        n_val = max(1, len(x) // 10)
        net = MarginalMDN(x.shape[1], y.shape[1], config.hidden, config.n_components)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
        gen = torch.Generator().manual_seed(config.seed)
        best, best_state = np.inf, None
        for epoch in range(config.epochs):
            net.train()
            perm = torch.randperm(len(x) - n_val, generator=gen) + n_val
            for i in range(0, len(perm), config.batch_size):
                idx = perm[i:i + config.batch_size]
                opt.zero_grad()
                loss = net.nll(xt[idx], yt[idx])
                loss.backward()
                opt.step()
            sched.step()
            net.eval()
            with torch.no_grad():
                val = float(net.nll(xt[:n_val], yt[:n_val]))
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
            if log:
                log(f"epoch {epoch + 1}/{config.epochs} val nll {val:.3f}")
        net.load_state_dict(best_state)
        net.eval()
        with torch.no_grad():
            scale = calibrate_widths(*net(xt[:n_val]), yt[:n_val])
        if log:
            log(f"width calibration factors {np.round(scale, 3).tolist()}")
        return cls(config, pca_mean, basis, x_mean, x_std, y_mean, y_std, net, scale)

    # ---------------------------------------------------------- inference
    def quantiles_binned(self, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray,
                         probs: tuple[float, ...]) -> np.ndarray:
        """(n, 8, len(probs)) marginal posterior quantiles in the reported units, from binned spectra."""
        spec, scal = features(flux, ivar, z)
        x = np.hstack([(spec - self.pca_mean) @ self.pca_basis.T, scal])
        xt = torch.from_numpy(((x - self.x_mean) / self.x_std).astype(np.float32))
        with torch.no_grad():
            logw, mu, sigma = self.net(xt)
            ym, ys = torch.from_numpy(self.y_mean), torch.from_numpy(self.y_std)
            if self.sigma_scale is not None:
                sigma = sigma * torch.from_numpy(np.asarray(self.sigma_scale, np.float32))[None, :, None]
            q = mixture_quantiles(logw, mu * ys[None, :, None] + ym[None, :, None], sigma * ys[None, :, None],
                                  tuple(probs))
        q = q.numpy().astype(np.float64)
        q[:, _anchor_columns(), :] += scal[:, 3].astype(np.float64)[:, None, None]
        for j, name in enumerate(QUANTITIES):
            q[:, j] = from_target_space(name, q[:, j])
        return q

    def percentiles_binned(self, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(n, 8, 3) p16/p50/p84 in the reported units, from binned spectra."""
        return self.quantiles_binned(flux, ivar, z, tuple(p / 100 for p in PERCENTILES))

    def predict_rows(self, targetid: np.ndarray, z: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> list[dict]:
        """Contract rows (Physics_Source='amortized') for brz-grid spectra; unusable ones NULL + flag."""
        targetid = np.asarray(targetid, np.int64)
        z = np.asarray(z, float)
        bflux, bivar = pm.bin_spectra(flux, ivar)
        flags = np.zeros(len(targetid), np.int64)
        flags[(bivar > 0).sum(axis=1) < MIN_GOOD_BINS] |= FLAGS["NO_DATA"]
        flags[~np.isfinite(z) | (z <= 0)] |= FLAGS["BAD_REDSHIFT"]
        flags[np.isfinite(z) & (z > 0) & ((z < Z_MIN) | (z > Z_MAX))] |= FLAGS["OUT_OF_TRAINING"]
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
        """Write the estimator (one torch file) atomically."""
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save({"config": asdict(self.config), "pca_mean": self.pca_mean, "pca_basis": self.pca_basis,
                    "x_mean": self.x_mean, "x_std": self.x_std, "y_mean": self.y_mean, "y_std": self.y_std,
                    "state": self.net.state_dict(), "quantities": list(QUANTITIES),
                    "sigma_scale": None if self.sigma_scale is None else np.asarray(self.sigma_scale),
                    "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "AmortizedEstimator":
        """Read an estimator written by :meth:`save`."""
        blob = torch.load(Path(path), weights_only=False)
        if blob["quantities"] != list(QUANTITIES):
            raise ValueError(f"{path}: estimator quantities {blob['quantities']} differ from {list(QUANTITIES)}")
        config = AmortizedConfig(**blob["config"])
        net = MarginalMDN(len(blob["x_mean"]), len(QUANTITIES), config.hidden, config.n_components)
        net.load_state_dict(blob["state"])
        net.eval()
        return cls(config, blob["pca_mean"], blob["pca_basis"], blob["x_mean"], blob["x_std"],
                   blob["y_mean"], blob["y_std"], net, blob.get("sigma_scale"))


def config_fingerprint(config: AmortizedConfig) -> str:
    """A short string identifying the training configuration (cache key for checkpoints)."""
    import hashlib

    blob = json.dumps({"features": FEATURE_VERSION, "config": asdict(config), "priors": [asdict(p) for p in pm.PRIORS],
                       "calib": [pm.CALIB_MU, pm.CALIB_SIGMA, pm.CALIB_BOUND], "bin": pm.FIT_BIN,
                       "z": [Z_MIN, Z_MAX], "snr": [SNR_MIN, SNR_MAX]}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def coverage(rows_or_q: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of galaxies whose [p16, p84] interval contains the truth, per quantity.

    ``rows_or_q`` is the (n, 8, 3) output of :meth:`AmortizedEstimator.percentiles_binned`.
    Floors are applied to the truth the same way as in training.
    """
    t = to_target_space(truth)
    out = {}
    for j, q in enumerate(QUANTITIES):
        lo = rows_or_q[:, j, 0]
        hi = rows_or_q[:, j, 2]
        tv = from_target_space(q, t[:, j])
        out[q] = float(np.mean((tv >= lo) & (tv <= hi)))
    return out
