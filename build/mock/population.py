"""Galaxy physics of the mock: masses, quenching by mass and environment, SFHs, dust, lines.

Recipes (each a published scaling, with scatter):

* Stellar mass function: Baldry et al. (2012) double Schechter, truncated below
  the survey's mass limit at each redshift (BGS-like r < 20.2, or LRG-like
  log M > 10.9 + 0.4 (z - 0.4)).
* Quenched fraction: logistic in log M around M_q = 10.55, lowered by 0.35 dex
  in knots, 0.2 dex in filaments and by the local overdensity, raised 0.15 dex
  in voids (Peng et al. 2010-like mass + environment quenching).
* Delayed-tau SFHs (bagpipes ``delayed``): star-forming tau 2-8 Gyr, quiescent
  tau 0.3-1.2 Gyr formed early; post-starbursts: a 10-30 % burst 0.3-1.2 Gyr ago
  truncated 0.05-0.25 Gyr ago; frosting: 0.2-1 % of the mass in a burst 0.1-1 Gyr old.
* Stellar metallicity: Gallazzi et al. (2005)-like log Z/Zsun = -0.6 + 0.3 (log M - 9).
* Dust: A_V = 0.2 + 0.3 log10(1 + SFR) for star formers (quiescent 0-0.3), gas
  A_V = A_V / 0.44 (Calzetti 2000).
* sigma_*: log sigma = 2.1 + 0.28 (log M - 10.5) (+-0.06 dex).
* Lines: L(Halpha) = SFR 10^41.27 erg/s (Kennicutt & Evans 2012; bagpipes' BC03 +
  Cloudy model at log U = -3 gives 10^41.44-41.48 for 100 Myr of constant star
  formation, a model-to-model difference the Bagpipes layer meets as it would in
  real data), case-B Balmer decrement, [NII]/Halpha from the Tremonti et al.
  (2004) gas metallicity and the Pettini & Pagel (2004) N2 calibration,
  [OIII]/Hbeta below the Kauffmann et al. (2003) line; Seyferts and LINERs add
  an AGN narrow-line component above the Kewley et al. (2001) line.

``physics="prior"`` (``ard mock --physics prior``) replaces the SFH, dust and
metallicity recipes by draws from the bagpipes layer's priors: a survey for
the simulation-based calibration of its posteriors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spectra import LINE_NAMES, luminosity_distance_cm
from .ssp import MOCK_COSMO, SFHParams, SFHResult, calzetti_k, star_formation_histories

POPULATIONS = ["star_forming", "quiescent", "green_pea", "post_starburst", "frosting", "agn_seyfert", "agn_liner", "star", "qso"]
_LINE_IDX = {name: i for i, name in enumerate(LINE_NAMES)}


def smf_phi(logm: np.ndarray) -> np.ndarray:
    """Baldry et al. (2012) double-Schechter SMF, per dex per Mpc^3 (h = 0.7)."""
    x = 10.0 ** (np.asarray(logm) - 10.66)
    return np.log(10) * np.exp(-x) * x * (3.96e-3 * x**-0.35 + 0.79e-3 * x**-1.47)


def mass_limit(z: np.ndarray, sample: str) -> np.ndarray:
    """Lowest stellar mass (log M_sun) the sample reaches at redshift z."""
    z = np.asarray(z, dtype=np.float64)
    if sample == "bright":
        dm = 5 * np.log10(np.maximum(luminosity_distance_cm(np.maximum(z, 1e-3)) / 3.086e19, 1e-3))
        abs_r = 20.2 - dm - 0.9 * z  # crude k-correction
        return np.clip(-0.4 * (abs_r - 4.65) + 0.1, 8.0, 11.6)
    return np.clip(10.9 + 0.4 * (z - 0.4), 10.6, 11.6)


def number_density(z: np.ndarray, sample: str) -> np.ndarray:
    """Comoving number density (Mpc^-3) above the sample's mass limit; LRG-like only at z > 0.3."""
    grid = np.linspace(8.0, 12.5, 451)
    cum = np.cumsum(smf_phi(grid)[::-1])[::-1] * (grid[1] - grid[0])
    n = np.interp(mass_limit(z, sample), grid, cum)
    if sample == "dark":
        n = n * np.clip((np.asarray(z) - 0.3) / 0.1, 0.0, 1.0)
    return n


def draw_masses(z: np.ndarray, sample: str, rng: np.random.Generator) -> np.ndarray:
    """log M drawn from the SMF above each galaxy's mass limit (inverse CDF)."""
    lo = mass_limit(z, sample)
    grid = np.linspace(8.0, 12.5, 901)
    cdf = np.concatenate([[0.0], np.cumsum(smf_phi(grid[1:]) * np.diff(grid))])
    u = np.interp(lo, grid, cdf) + rng.random(z.size) * (cdf[-1] - np.interp(lo, grid, cdf))
    return np.interp(u, cdf, grid)


@dataclass
class GalaxyTruth:
    """Physical truth of a batch of galaxies (arrays of length n)."""

    population: np.ndarray  # str labels from POPULATIONS
    sfh: SFHParams
    log_mass: np.ndarray  # surviving stellar mass (bagpipes stellar_mass)
    sfr: np.ndarray
    ssfr: np.ndarray
    mass_weighted_age: np.ndarray
    t_quench: np.ndarray
    t_quench_cosmic: np.ndarray
    av: np.ndarray
    av_gas: np.ndarray
    sigma_star: np.ndarray
    sigma_gas: np.ndarray
    line_flux: np.ndarray  # (n, nlines) observed (attenuated) 1e-17 erg/s/cm2
    gas_oh: np.ndarray  # 12 + log O/H
    fiber_frac: np.ndarray
    weights: np.ndarray  # SSP weights for the spectra


def quenched_probability(logm: np.ndarray, web_class: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Probability to be quenched given mass and environment (knots and filaments quench more)."""
    mq = 10.55 - 0.35 * (web_class == 3) - 0.2 * (web_class == 2) + 0.15 * (web_class == 0)
    mq = mq - 0.25 * np.clip(np.log10(1.0 + np.clip(delta, -0.9, None)), -0.5, 1.0)
    return 1.0 / (1.0 + np.exp(-(logm - mq) / 0.3))


#: ``galaxy_population`` physics: the published scalings above, or the Swiss Army priors.
PHYSICS = ("realistic", "prior")


def galaxy_population(
    z: np.ndarray, web_class: np.ndarray, delta: np.ndarray, sample: str, rng: np.random.Generator,
    physics: str = "realistic",
) -> GalaxyTruth:
    """Draw physical parameters for galaxies at redshifts ``z`` in environment (web class, delta).

    ``physics="prior"`` draws age, tau, metallicity and A_V of a plain delayed-tau
    SFH from the bagpipes layer's priors (``pipes_model.sample_prior``) instead of
    the scalings: a simulation-based-calibration survey, on which the amortized
    posteriors should cover the truth as often as they claim. The stellar mass
    still follows the survey's mass function (a flux-limited survey cannot hold
    a uniform mass prior; the posterior of the mass is set by the flux), and the
    lines, sigma and fibre follow the usual recipes.
    """
    if physics not in PHYSICS:
        raise ValueError(f"physics must be one of {PHYSICS} (got {physics!r})")
    n = z.size
    logm = draw_masses(z, sample, rng)
    if physics == "prior":
        return _prior_population(z, logm, rng)
    pq = quenched_probability(logm, web_class, delta)
    if sample == "dark":
        pq = np.maximum(pq, 0.85)  # LRG colour selection keeps red galaxies
    quenched = rng.random(n) < pq
    pop = np.where(quenched, "quiescent", "star_forming").astype("<U16")
    u = rng.random(n)
    gp = (~quenched) & (sample == "bright") & (z > 0.1) & (z < 0.35) & (u < 0.03)
    psb = (logm > 9.5) & (logm < 11.2) & (u > 0.97) & ~gp
    frost = quenched & (u > 0.93) & (u <= 0.97)
    sey = (~quenched) & (logm > 10.2) & (u > 0.90) & (u <= 0.93)
    liner = quenched & (u > 0.85) & (u <= 0.93) & ~frost
    for mask, name in ((gp, "green_pea"), (psb, "post_starburst"), (frost, "frosting"), (sey, "agn_seyfert"), (liner, "agn_liner")):
        pop[mask] = name
    logm = np.where(gp, rng.uniform(8.3, 9.4, n), logm)
    aou = MOCK_COSMO.age(z).value
    old = quenched | psb | frost | liner
    tau = np.where(old, rng.uniform(0.3, 1.2, n), rng.uniform(2.0, 8.0, n))
    start = np.where(old, rng.uniform(0.3, 2.0, n), rng.uniform(0.5, 4.0, n))  # Gyr after the Big Bang
    age = np.clip(aou - start, 0.5, aou - 0.05)
    burst_frac = np.zeros(n)
    burst_age = np.full(n, 0.1)
    burst_tau = np.full(n, 0.05)
    trunc = np.zeros(n)
    burst_frac[psb] = rng.uniform(0.1, 0.3, psb.sum())
    burst_age[psb] = rng.uniform(0.3, 1.2, psb.sum())
    burst_tau[psb] = 0.1
    trunc[psb] = rng.uniform(0.05, 0.25, psb.sum())
    # Frosting: ~0.2-1 % of the mass formed over the last 0.1-1 Gyr (Trager et al. 2000), which keeps
    # the galaxy well below the main sequence (sSFR ~ 1e-11 /yr) while its young light fills in Balmer lines.
    burst_frac[frost] = rng.uniform(0.002, 0.01, frost.sum())
    burst_age[frost] = rng.uniform(0.1, 1.0, frost.sum())
    burst_tau[frost] = 1.0
    # Green peas: a young, intense starburst on a small old component.
    burst_frac[gp] = rng.uniform(0.2, 0.5, gp.sum())
    burst_age[gp] = rng.uniform(0.02, 0.1, gp.sum())
    burst_tau[gp] = 1.0
    logz = np.clip(-0.6 + 0.3 * (logm - 9.0), -1.2, 0.3) + rng.normal(0, 0.1, n)
    logz = np.where(gp, rng.uniform(-1.0, -0.6, n), logz)
    metallicity = np.clip(10.0**logz, 0.02, 2.5)
    sfh = SFHParams(logm + 0.25, age, tau, metallicity, burst_frac, burst_age, burst_tau, trunc, aou)
    res = _histories_at_mass(sfh, logm)
    sf = ~old
    av = np.where(sf, np.clip(0.2 + 0.3 * np.log10(1.0 + res.sfr) + rng.normal(0, 0.15, n), 0.0, 2.0), rng.uniform(0.0, 0.3, n))
    av = np.where(gp, rng.uniform(0.0, 0.3, n), av)
    return _lines_and_kinematics(z, pop, sfh, res, av, sf, rng)


def _histories_at_mass(sfh: SFHParams, logm: np.ndarray) -> SFHResult:
    """The SFH results of ``sfh`` with ``massformed`` moved so the surviving mass is ``logm``."""
    res, _ = star_formation_histories(sfh)
    # Surviving mass, SSP weights and SFR scale linearly with mass formed: one correction hits the
    # target mass exactly, and rescaling the result equals recomputing it (saves a second SFH pass).
    shift = logm - res.stellar_mass
    sfh.massformed = sfh.massformed + shift
    scale = 10.0**shift
    res.weights *= scale[:, None]
    res.sfr = res.sfr * scale
    res.stellar_mass = res.stellar_mass + shift
    res.formed_mass = res.formed_mass + shift
    return res


def _prior_population(z: np.ndarray, logm: np.ndarray, rng: np.random.Generator) -> GalaxyTruth:
    """Plain delayed-tau galaxies whose age, tau, metallicity and A_V are drawn from the Swiss Army priors."""
    from ard_sql.science import pipes_model

    n = z.size
    theta = pipes_model.sample_prior(n, z, rng)  # massformed (unused: the mass is logm), age, tau, metallicity, Av
    aou = MOCK_COSMO.age(z).value
    zeros = np.zeros(n)
    sfh = SFHParams(logm + 0.25, np.minimum(theta[:, 1], aou), theta[:, 2], theta[:, 3], zeros, np.full(n, 0.1),
                    np.full(n, 0.05), zeros.copy(), aou)
    res = _histories_at_mass(sfh, logm)
    sf = np.nan_to_num(res.ssfr, nan=-np.inf) > -11.0
    pop = np.where(sf, "star_forming", "quiescent").astype("<U16")
    return _lines_and_kinematics(z, pop, sfh, res, theta[:, 4], sf, rng)


def _lines_and_kinematics(z: np.ndarray, pop: np.ndarray, sfh: SFHParams, res: SFHResult, av: np.ndarray,
                          sf: np.ndarray, rng: np.random.Generator) -> GalaxyTruth:
    """Gas A_V, stellar and gas sigma, gas metallicity, line fluxes and fibre fraction of drawn galaxies."""
    n = z.size
    gp = pop == "green_pea"
    av_gas = av / 0.44
    log_sig = 2.1 + 0.28 * (res.stellar_mass - 10.5) - 0.05 * sf + rng.normal(0, 0.06, n)
    sigma_star = np.clip(10.0**log_sig, 30.0, 450.0)
    sigma_gas = np.clip(0.7 * sigma_star + rng.normal(20, 10, n), 30.0, 300.0)
    oh = np.clip(-1.492 + 1.847 * res.stellar_mass - 0.08026 * res.stellar_mass**2, 8.0, 9.2) + rng.normal(0, 0.08, n)
    lines = emission_lines(res.sfr, oh, av_gas, z, pop, rng)
    sigma_gas = np.where(pop == "agn_seyfert", rng.uniform(200, 400, n), sigma_gas)
    fiber = np.clip(0.25 + 0.8 * z + rng.normal(0, 0.05, n), 0.2, 0.8)
    fiber = np.where(gp, 0.85, fiber)
    return GalaxyTruth(pop, sfh, res.stellar_mass, res.sfr, res.ssfr, res.mass_weighted_age, res.t_quench,
                       res.t_quench_cosmic, av, av_gas, sigma_star, sigma_gas, lines, oh, fiber, res.weights)


def emission_lines(sfr: np.ndarray, oh: np.ndarray, av_gas: np.ndarray, z: np.ndarray, pop: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """(n, nlines) observed, attenuated line fluxes (1e-17 erg/s/cm2) in ``LINE_NAMES`` order."""
    n = sfr.size
    flux_scale = 1.0 / (4.0 * np.pi * luminosity_distance_cm(z) ** 2) / 1e-17
    ha = sfr * 10.0**41.27 * flux_scale
    n2 = np.clip((oh - 8.90) / 0.57, -1.6, -0.3) + rng.normal(0, 0.05, n)
    o3 = 0.61 / (n2 - 0.05) + 1.3 - 0.25 + rng.normal(0, 0.08, n)
    gp = pop == "green_pea"
    n2 = np.where(gp, rng.uniform(-1.6, -1.2, n), n2)
    o3 = np.where(gp, rng.uniform(0.7, 0.9, n), o3)
    o2 = 0.35 + 0.2 * o3 + rng.normal(0, 0.08, n)
    s2 = -0.45 + rng.normal(0, 0.08, n)
    out = _line_set(ha, n2, o3, o2, s2)
    # AGN narrow-line regions, on top of any star formation.
    sey, lin = pop == "agn_seyfert", pop == "agn_liner"
    agn_ha = np.zeros(n)
    agn_ha[sey] = np.maximum(3.0 * ha[sey], 10.0 ** rng.uniform(40.5, 41.5, sey.sum()) * flux_scale[sey])
    # LINERs: the (weak) AGN still dominates the residual star formation of its quenched host, so the
    # summed ratios sit above the Kewley et al. (2001) line, as the label promises.
    agn_ha[lin] = np.maximum(5.0 * ha[lin], 10.0 ** rng.uniform(39.3, 40.3, lin.sum()) * flux_scale[lin])
    a_n2 = np.where(sey, rng.uniform(-0.15, 0.25, n), rng.uniform(0.1, 0.4, n))
    a_o3 = np.where(sey, rng.uniform(0.7, 1.1, n), rng.uniform(0.0, 0.4, n))
    a_o2 = np.where(sey, 0.45, 0.65) + rng.normal(0, 0.05, n)
    a_s2 = np.where(sey, -0.3, -0.1) + rng.normal(0, 0.05, n)
    out += _line_set(agn_ha, a_n2, a_o3, a_o2, a_s2)
    out[pop == "post_starburst"] = 0.0  # truncated: no ionising stars left
    lw = np.array([3727.1, 3729.9, 4102.9, 4341.7, 4862.7, 4960.3, 5008.2, 6549.9, 6564.6, 6585.3, 6718.3, 6732.7])
    return out * 10.0 ** (-0.4 * av_gas[:, None] * calzetti_k(lw)[None, :])


def _line_set(ha: np.ndarray, n2: np.ndarray, o3: np.ndarray, o2: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Intrinsic line fluxes from Halpha and log ratios N2, O3 (5007/Hb), OII/Hb, SII/Ha (case B)."""
    hb = ha / 2.86
    out = np.zeros((ha.size, len(LINE_NAMES)))
    i = _LINE_IDX
    out[:, i["Halpha"]] = ha
    out[:, i["Hbeta"]] = hb
    out[:, i["Hgamma"]] = 0.468 * hb
    out[:, i["Hdelta"]] = 0.259 * hb
    out[:, i["NII_6584"]] = ha * 10.0**n2
    out[:, i["NII_6548"]] = out[:, i["NII_6584"]] / 3.05
    out[:, i["OIII_5007"]] = hb * 10.0**o3
    out[:, i["OIII_4959"]] = out[:, i["OIII_5007"]] / 2.98
    oii = hb * 10.0**o2
    out[:, i["OII_3729"]] = oii * 1.35 / 2.35
    out[:, i["OII_3726"]] = oii / 2.35
    sii = ha * 10.0**s2
    out[:, i["SII_6716"]] = sii * 1.4 / 2.4
    out[:, i["SII_6731"]] = sii / 2.4
    return out
