"""The "Swiss Army" stellar-population model: one place for every prior.

Both the Bagpipes fits (``pipes_fit``) and the amortized estimator
(``amortized``) use exactly this model, so their posteriors are comparable.
The priors are documented, with reasons, in ``docs/physics.md``.

Free parameters (uniform unless said otherwise)::

    massformed   log10 M_formed / Msun        U(7, 13)
    age          Gyr since SF began           U(0.05, t_univ(z))
    tau          Gyr, delayed-tau e-folding   log-uniform(0.1, 10)
    metallicity  Z / Zsun (constant)          log-uniform(0.1, 2.5)
    Av           mag, Calzetti (2000)         half-normal, sigma 0.6, on [0, 2]
    noise:scaling  white-noise scale factor   log-uniform(0.5, 5)   (fits only)

Calibration: the model is divided by a 2nd-order Chebyshev polynomial
P(x) = 1 + c1 T1(x) + c2 T2(x) over the fitted range (bagpipes
``polynomial_bayesian``), c1, c2 ~ N(0, 0.1) truncated to +-0.3. The constant
term is fixed to 1: without photometry the spectrum's own flux calibration
(DESI's, good to a few per cent) is what sets the stellar mass.

Fixed: redshift = Z (redrock); nebular logU = -3 (Cloudy grids of bagpipes);
dust ``eta`` = 1/0.44 (:data:`ETA`: lines and stars younger than 10 Myr see
2.27 Av, Calzetti et al. 2000);
velocity dispersion = the pPXF layer's ``VelDisp`` when present (else 150 km/s),
added in quadrature to DESI's instrumental sigma.

Derived quantities (bagpipes' own definitions unless said otherwise):
``LogMass`` = log10 surviving stellar mass (``sfh.stellar_mass``); ``SFR`` =
mean SFR over the last 100 Myr; ``sSFR`` = log10(SFR / M*); ``Age`` = mass-
weighted age; ``t_quench``: see :func:`t_quench`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from ard_sql import grid

#: Number of native 0.8 A pixels averaged into one fitting bin (8 A bins).
FIT_BIN = 10

#: Fraction of the peak SFR that defines the quenching moment (see t_quench).
QUENCH_FRACTION = 0.1

#: Default stellar velocity dispersion (km/s) when the pPXF layer has none.
DEFAULT_VELDISP = 150.0

#: DESI instrumental Gaussian sigma in km/s at a representative R = 3500.
INSTRUMENT_SIGMA_KMS = 299792.458 / 3500.0 / 2.3548

#: Nebular ionisation parameter (fixed).
LOGU = -3.0

#: Extra attenuation of birth clouds (bagpipes dust ``eta``): nebular lines (and stars younger than
#: bagpipes' t_bc = 10 Myr) see ``ETA x Av``. Calzetti et al. (2000): E(B-V)_stars = 0.44 E(B-V)_gas.
#: With bagpipes' default 1 the model read the mock's (Calzetti-attenuated) Balmer lines as too little
#: star formation (SFR of star formers -0.38 dex); measurements in bench/RESULTS.md, "Bagpipes layer".
#: A part of the model: it is in ``model_key``.
ETA = 1.0 / 0.44

#: Calibration polynomial coefficients c1, c2: truncated Gaussian priors (mu, sigma, bound).
CALIB_MU, CALIB_SIGMA, CALIB_BOUND = 0.0, 0.1, 0.3
CALIB_ORDER = 2


@dataclass(frozen=True)
class Prior:
    """One free parameter of the model: its name in bagpipes and its range."""

    component: str
    """bagpipes component ('delayed', 'dust', 'noise')."""
    name: str
    """Parameter name inside the component."""
    low: float
    high: float
    log: bool = False
    """Log-uniform (bagpipes ``prior='log_10'``) instead of uniform."""
    sigma: float | None = None
    """When set: a Gaussian of this width centred on ``mu``, truncated to [low, high] (bagpipes ``'Gaussian'``)."""
    mu: float = 0.0

    def high_at(self, z: float | np.ndarray) -> np.ndarray:
        """Upper bound at redshift ``z``: ``age`` stops at the age of the Universe there."""
        return np.minimum(self.high, age_of_universe(z)) if self.name == "age" else np.broadcast_to(self.high, np.shape(z))

    def from_unit(self, u: np.ndarray, high: np.ndarray | float | None = None) -> np.ndarray:
        """Map uniform draws ``u`` in [0, 1) to this prior (inverse CDF), as bagpipes' ``prior.transform``."""
        hi = np.asarray(self.high if high is None else high, dtype=float)
        if self.sigma is not None:
            from scipy.stats import truncnorm

            return truncnorm.ppf(u, (self.low - self.mu) / self.sigma, (hi - self.mu) / self.sigma, self.mu, self.sigma)
        if self.log:
            return 10 ** (np.log10(self.low) + u * (np.log10(hi) - np.log10(self.low)))
        return self.low + u * (hi - self.low)

    def bagpipes(self, high: float | None = None) -> dict:
        """This prior as bagpipes ``fit_instructions`` entries."""
        out: dict = {self.name: (self.low, self.high if high is None else high)}
        if self.sigma is not None:
            out.update({f"{self.name}_prior": "Gaussian", f"{self.name}_prior_mu": self.mu,
                        f"{self.name}_prior_sigma": self.sigma})
        elif self.log:
            out[f"{self.name}_prior"] = "log_10"
        return out


#: The physical free parameters, in the order of the amortized parameter vector.
#: ``age``'s upper bound is the age of the Universe at Z (set per galaxy).
PRIORS: tuple[Prior, ...] = (
    Prior("delayed", "massformed", 7.0, 13.0),
    Prior("delayed", "age", 0.05, 13.0),
    Prior("delayed", "tau", 0.1, 10.0, log=True),
    Prior("delayed", "metallicity", 0.1, 2.5, log=True),
    # Half-normal: most galaxies have a continuum A_V of a few tenths of a magnitude (docs/physics.md).
    Prior("dust", "Av", 0.0, 2.0, sigma=0.6),
)
NOISE_PRIOR = Prior("noise", "scaling", 0.5, 5.0, log=True)

#: Floors of the reported SFR (solMass/yr) and log10 sSFR (/yr). The model's SFR of a long-quenched galaxy is
#: 1e-11 or 0 (log sSFR -21, or NaN where bagpipes divides 0 by the mass): below what any spectrum can tell, so
#: every row (amortized or nested sampling) reports these instead (a value at the floor reads: below it).
SFR_FLOOR, SSFR_FLOOR = 1e-5, -15.0


def floor_sfr(sfr: np.ndarray) -> np.ndarray:
    """SFR draws with :data:`SFR_FLOOR` applied (NaN stays NaN)."""
    return np.maximum(np.asarray(sfr, float), SFR_FLOOR)


def floor_ssfr(ssfr: np.ndarray) -> np.ndarray:
    """log10 sSFR draws with :data:`SSFR_FLOOR` applied; NaN or -inf (an SFR of 0) read as the floor."""
    v = np.asarray(ssfr, float)
    return np.maximum(np.nan_to_num(v, nan=SSFR_FLOOR, neginf=SSFR_FLOOR), SSFR_FLOOR)


def model_key() -> str:
    """Short hash of everything that defines the model (priors, fixed physics, binning, bagpipes version).

    Stored with every Bagpipes fit: a fit made under another model is stale
    (not merged, fitted again by the daemon), so the Bagpipes and amortized
    rows of one ARD always come from one model.
    """
    import hashlib
    import json
    from dataclasses import asdict
    from importlib.metadata import version

    from ard_sql.science import pipes_env

    blob = json.dumps({"priors": [asdict(p) for p in PRIORS], "noise": asdict(NOISE_PRIOR),
                       "calib": [CALIB_MU, CALIB_SIGMA, CALIB_BOUND, CALIB_ORDER], "bin": FIT_BIN, "logU": LOGU,
                       "eta": ETA, "veldisp": [DEFAULT_VELDISP, INSTRUMENT_SIGMA_KMS], "quench": QUENCH_FRACTION,
                       "R_spec": pipes_env.MODEL_R_SPEC, "bagpipes": version("bagpipes")}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def age_of_universe(z: float | np.ndarray) -> np.ndarray:
    """Age of the Universe (Gyr) at redshift z in bagpipes' cosmology (H0=70, Om=0.3)."""
    from astropy.cosmology import FlatLambdaCDM

    return np.asarray(FlatLambdaCDM(H0=70.0, Om0=0.3).age(np.asarray(z, dtype=float)).value)


def veldisp_total(veldisp: float | None) -> float:
    """Model broadening (km/s): stellar sigma (pPXF, else the default) + instrument, in quadrature."""
    sigma = DEFAULT_VELDISP if veldisp is None or not np.isfinite(veldisp) or veldisp <= 0 else float(veldisp)
    return float(np.hypot(sigma, INSTRUMENT_SIGMA_KMS))


def fit_wavelengths() -> np.ndarray:
    """Centres (vacuum A, observed) of the 8 A fitting bins over the DESI brz grid."""
    wave = grid.brz_wavelength()
    n = (wave.size // FIT_BIN) * FIT_BIN
    return wave[:n].reshape(-1, FIT_BIN).mean(axis=1)


def bin_spectra(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance-weighted binning of (n, NPIX) spectra onto :func:`fit_wavelengths`.

    Returns (flux, ivar) of shape (n, nbin); a bin with no good pixel has ivar 0
    and flux 0.
    """
    # float32 arithmetic (10-pixel sums lose nothing that matters), float64 results
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float32))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=np.float32))
    good = np.isfinite(ivar) & np.isfinite(flux) & (ivar > 0)
    ivar = np.where(good, ivar, np.float32(0))
    n = (flux.shape[1] // FIT_BIN) * FIT_BIN
    w = ivar[:, :n].reshape(len(flux), -1, FIT_BIN)
    wf = np.where(good, flux * ivar, np.float32(0))[:, :n].reshape(len(flux), -1, FIT_BIN)
    wsum = w.sum(axis=2, dtype=np.float64)
    out = np.divide(wf.sum(axis=2, dtype=np.float64), wsum, out=np.zeros_like(wsum), where=wsum > 0)
    return out, wsum


def fit_instructions(z: float, veldisp: float | None = None, *, noise: bool = True, calib: bool = True) -> dict:
    """The bagpipes ``fit_instructions`` dictionary for one galaxy at redshift ``z``."""
    delayed: dict = {}
    dust: dict = {"type": "Calzetti", "eta": ETA}
    for p in PRIORS:
        target = delayed if p.component == "delayed" else dust
        target.update(p.bagpipes(float(p.high_at(z))))
    instructions = {
        "redshift": float(z),
        "veldisp": veldisp_total(veldisp),
        "delayed": delayed,
        "dust": dust,
        "nebular": {"logU": LOGU},
    }
    if calib:
        cal: dict = {"type": "polynomial_bayesian", "0": 1.0}
        for k in range(1, CALIB_ORDER + 1):
            cal.update({str(k): (-CALIB_BOUND, CALIB_BOUND), f"{k}_prior": "Gaussian",
                        f"{k}_prior_mu": CALIB_MU, f"{k}_prior_sigma": CALIB_SIGMA})
        instructions["calib"] = cal
    if noise:
        instructions["noise"] = {"type": "white_scaled", **NOISE_PRIOR.bagpipes()}
    return instructions


def model_components(theta: np.ndarray, z: float, veldisp: float | None = None) -> dict:
    """bagpipes ``model_components`` for one physical parameter vector (order of :data:`PRIORS`)."""
    massformed, age, tau, metallicity, av = (float(v) for v in theta)
    return {
        "redshift": float(z),
        "veldisp": veldisp_total(veldisp),
        "delayed": {"massformed": massformed, "age": age, "tau": tau, "metallicity": metallicity},
        "dust": {"type": "Calzetti", "Av": av, "eta": ETA},
        "nebular": {"logU": LOGU},
    }


def sample_prior(n: int, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw (n, 5) physical parameter vectors from the priors at redshifts ``z``."""
    z = np.broadcast_to(np.asarray(z, dtype=float), (n,))
    out = np.empty((n, len(PRIORS)))
    for j, p in enumerate(PRIORS):
        out[:, j] = p.from_unit(rng.random(n), p.high_at(z))
    return out


def sample_calibration(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw (n, CALIB_ORDER) calibration coefficients c1.. from their truncated Gaussian priors."""
    from scipy.stats import truncnorm

    a = (-CALIB_BOUND - CALIB_MU) / CALIB_SIGMA
    b = (CALIB_BOUND - CALIB_MU) / CALIB_SIGMA
    return truncnorm.rvs(a, b, loc=CALIB_MU, scale=CALIB_SIGMA, size=(n, CALIB_ORDER), random_state=rng)


def calibration_curve(wave: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """P(x) = 1 + sum c_k T_k(x) over ``wave`` mapped to [-1, 1] (bagpipes' convention); (n, nwave)."""
    from numpy.polynomial.chebyshev import chebvander

    wave = np.asarray(wave, float)
    x = 2.0 * (wave - (wave[0] + (wave[-1] - wave[0]) / 2.0)) / (wave[-1] - wave[0])
    coeffs = np.atleast_2d(coeffs)
    full = np.column_stack([np.ones(len(coeffs)), coeffs])
    return full @ chebvander(x, coeffs.shape[1]).T


def _quench_x(fraction: float) -> float:
    # SFR/peak of a delayed-tau SFH is x*exp(1-x), x = t/tau; the decline branch is x > 1.
    return brentq(lambda x: x * np.exp(1.0 - x) - fraction, 1.0, 100.0)


QUENCH_X = _quench_x(QUENCH_FRACTION)


def t_quench(age: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Quenching lookback time (Gyr) of a delayed-tau SFH.

    Definition (docs/physics.md): the lookback time at which SFR(t) falls,
    after its peak, below :data:`QUENCH_FRACTION` (10 %) of its peak value.
    For SFR ∝ t exp(-t/tau) (t since onset) that moment is t = x_q tau with
    x_q exp(1 - x_q) = 0.1, x_q = 4.89, so ``t_quench = age - x_q tau``.
    Negative values mean the galaxy has not yet quenched at the epoch of
    observation (it would in ``-t_quench`` Gyr); the definition is continuous,
    so its percentiles are well defined for every galaxy.
    """
    return np.asarray(age, dtype=float) - QUENCH_X * np.asarray(tau, dtype=float)
