"""The truth table of the mock and the noise-free spectra that follow from it.

Every spectrum of the mock is a deterministic function of its truth row
(the noise is the only random part), so ``regenerate_truth_spectra`` rebuilds
the noise-free spectrum of any target from ``DIR/truth.parquet``, at the
instrument's resolution (``instrument=True``, what the noisy coadd flux
scatters around) or intrinsic (``instrument=False``).

Columns of ``truth.parquet`` (units in the Parquet field metadata):

TARGETID, RA, DEC (deg); Z_COSMO (cosmological), Z (observed, with peculiar
velocity; the spectra are built at Z); V_LOS (km/s; Z = (1 + Z_COSMO)(1 + V_LOS/c) - 1);
V_LOS_FLOW (km/s, the coherent Zel'dovich-flow part of V_LOS; the rest, V_LOS - V_LOS_FLOW, is
the random motion inside structures, 150 sqrt(1 + DELTA) km/s rms; for galaxies. Stars have
V_LOS = c Z and QSOs 0, both with V_LOS_FLOW = 0); CX, CY, CZ comoving
position (Mpc, box frame, observer at 0); HEALPIX (nside 64 nested), SURVEY,
PROGRAM, SAMPLE (bright/dark), SPECTYPE (GALAXY/STAR/QSO), POPULATION
(star_forming, quiescent, green_pea, post_starburst, frosting, agn_seyfert,
agn_liner, star, qso); LOG_MASS (log10 surviving stellar mass, bagpipes
``stellar_mass``), LOG_MASS_FORMED, SFR (M_sun/yr, 100 Myr), SSFR (log10 /yr),
AGE_MW (mass-weighted age, Gyr), AV (Calzetti, stars), AV_GAS, METALLICITY
(Z/Z_sun), TAU (Gyr), SFH_AGE (Gyr since the delayed-tau start), BURST_FRAC,
BURST_AGE, BURST_TAU (Gyr), TRUNC_AGE (Gyr lookback, 0 = none), T_QUENCH
(lookback Gyr, NaN if not quenched), T_QUENCH_COSMIC (age of the Universe at
quenching, bagpipes ``tquench``), SIGMA_STAR, SIGMA_GAS (km/s; the spectrum
shows SIGMA_STAR at 5000 A rest with the templates' own 2.51 A counted in it, as
a real galaxy observed at DESI resolution would: ``spectra.kinematic_broadening``;
below 64 km/s it shows the library's resolution), OH_GAS (12+log O/H),
FIBER_FRAC, <line>_Flux for each of ard_sql.contract.PPXF_LINES (observed,
attenuated, 1e-17 erg/s/cm2), DELTA (true matter density contrast, Gaussian
smoothing DELTA_SMOOTHING_MPC in the file metadata, nearest grid cell),
WEB_CLASS (T-web of the matter field, 0 Void 1 Sheet 2 Filament 3 Knot, same
smoothing, lambda_th in the metadata), MAG_G/R/Z/W1/W2 (AB), TEFF (stars),
QSO_ALPHA, QSO_LINE_SCALE (QSOs).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ard_sql import grid

from . import objects, spectra
from .ssp import C_KMS, SFHParams, star_formation_histories

TRUTH_UNITS: dict[str, str] = {
    "RA": "deg", "DEC": "deg", "V_LOS": "km / s", "V_LOS_FLOW": "km / s", "CX": "Mpc", "CY": "Mpc", "CZ": "Mpc",
    "LOG_MASS": "dex(solMass)", "LOG_MASS_FORMED": "dex(solMass)", "SFR": "solMass / yr", "SSFR": "dex(1 / yr)",
    "AGE_MW": "Gyr", "AV": "mag", "AV_GAS": "mag", "TAU": "Gyr", "SFH_AGE": "Gyr", "BURST_AGE": "Gyr",
    "BURST_TAU": "Gyr", "TRUNC_AGE": "Gyr", "T_QUENCH": "Gyr", "T_QUENCH_COSMIC": "Gyr", "SIGMA_STAR": "km / s",
    "SIGMA_GAS": "km / s", "TEFF": "K", **{f"{ln}_Flux": "1e-17 erg / (s cm2)" for ln in spectra.LINE_NAMES},
    **{f"MAG_{b}": "mag(AB)" for b in objects.BANDS},
}
#: Wavelength (A) where the stitched brz truth spectrum switches from one arm's resolution to the next.
ARM_SWITCH = (5780.0, 7570.0)


def _col(t: Mapping[str, np.ndarray] | object, name: str) -> np.ndarray:
    if hasattr(t, "column"):  # pyarrow Table
        return np.asarray(t.column(name).to_numpy(zero_copy_only=False))
    return np.asarray(t[name])


def arm_resolution_data() -> dict[str, np.ndarray]:
    """The (11, nwave) RESOLUTION data of each arm (same for every spectrum of the mock)."""
    return {arm: spectra.resolution_diagonals(grid.arm_wavelength(arm), spectra.arm_resolving_power(arm, grid.arm_wavelength(arm)))
            for arm in grid.ARMS}


#: Truth columns of a galaxy's star-formation history, in ``SFHParams`` order.
SFH_COLUMNS = ("LOG_MASS_FORMED", "SFH_AGE", "TAU", "METALLICITY", "BURST_FRAC", "BURST_AGE", "BURST_TAU", "TRUNC_AGE",
               "AGE_UNIVERSE")


def _sfh_params(t: Mapping[str, np.ndarray] | object, rows: np.ndarray | slice) -> SFHParams:
    """The true star-formation histories of ``rows`` of the truth table."""
    return SFHParams(*(np.asarray(_col(t, c), np.float64)[rows] for c in SFH_COLUMNS))


def t_quench_truth(t: Mapping[str, np.ndarray] | object, batch: int = 2000) -> np.ndarray:
    """Each galaxy's true ``t_quench`` in the bagpipes layer's definition (docs/physics.md), Gyr lookback.

    The truth table's T_QUENCH is bagpipes' own definition (SFR below 10 % of the
    mean SFR over the Universe's age; NaN when not quenched), which the layer does
    not report. This is the layer's: the lookback time at which SFR(t), after its
    peak, first fell below ``QUENCH_FRACTION`` of the peak, read off the mock's
    own star-formation history (delayed tau, burst, truncation) and interpolated
    between the two grid ages around the crossing. A pure delayed tau gets the
    exact ``age - x_q tau`` (negative if it has not fallen yet, as the layer's);
    any other history that has not fallen gets NaN (no definite value: in the mock
    these are the green peas' bursts), as does one that forms no stars. Non-galaxies
    are NaN. Reads the columns ``SPECTYPE`` and :data:`SFH_COLUMNS`.
    """
    from ard_sql.science.pipes_model import QUENCH_FRACTION, t_quench

    from .ssp import age_grids

    spectype = np.asarray(_col(t, "SPECTYPE")).astype(str)
    p_all = _sfh_params(t, slice(None))
    ok = (spectype == "GALAXY") & np.all([np.isfinite(getattr(p_all, f)) for f in p_all.__dataclass_fields__], axis=0)
    out = np.full(len(spectype), np.nan)
    plain = ok & (p_all.burst_frac <= 0) & (p_all.trunc_age <= 0)
    out[plain] = t_quench(p_all.age[plain], p_all.tau[plain])  # exact for a pure delayed tau
    # a truncation at or before the start of every component leaves no stars (star_formation_histories refuses)
    start = np.maximum(np.minimum(p_all.age, p_all.age_of_universe),
                       np.where(p_all.burst_frac > 0, np.minimum(p_all.burst_age, p_all.age_of_universe), 0.0))
    forms = (p_all.trunc_age <= 0) | (p_all.trunc_age < start)
    lookback = age_grids().fine_ages * 1e-9
    rows = np.flatnonzero(ok & ~plain & forms)
    for i in range(0, rows.size, batch):
        r = rows[i:i + batch]
        _, sfr = star_formation_histories(_sfh_params(t, r))
        n = np.arange(r.size)
        peak = np.argmax(sfr, axis=1)
        cut = QUENCH_FRACTION * sfr[n, peak]
        fell = (sfr < cut[:, None]) & (np.arange(sfr.shape[1])[None, :] < peak[:, None])
        # the first fall after the peak: the largest lookback below the peak's where SFR is under the cut;
        # the crossing lies between it and the next older grid age (still above the cut)
        first = sfr.shape[1] - 1 - np.argmax(fell[:, ::-1], axis=1)
        nxt = np.minimum(first + 1, sfr.shape[1] - 1)
        s0, s1 = sfr[n, first], sfr[n, nxt]
        frac = np.clip((cut - s0) / np.where(s1 > s0, s1 - s0, 1.0), 0.0, 1.0)
        crossing = lookback[first] + frac * (lookback[nxt] - lookback[first])
        out[r] = np.where(fell.any(axis=1), crossing, np.nan)
    return out


def intrinsic_spectra(t: Mapping[str, np.ndarray] | object, wave: np.ndarray) -> np.ndarray:
    """(n, nwave) noise-free spectra before the instrument, 1e-17 erg/s/cm2/A, from truth columns."""
    return intrinsic_spectra_grids(t, [wave])[0]


def intrinsic_spectra_grids(
    t: Mapping[str, np.ndarray] | object, waves: list[np.ndarray], weights: np.ndarray | None = None
) -> list[np.ndarray]:
    """Noise-free spectra on several uniform observed grids at once (one rest continuum per galaxy).

    ``weights`` (galaxies x SSPs), when given, are the SSP weights of the galaxy rows in order
    (``star_formation_histories`` of the same truth columns); otherwise they are recomputed.
    """
    stype = _col(t, "SPECTYPE").astype(str)
    z = _col(t, "Z").astype(np.float64)
    outs = [np.zeros((stype.size, w.size), dtype=np.float32) for w in waves]
    gal = np.flatnonzero(stype == "GALAXY")
    if gal.size:
        p = _sfh_params(t, gal)
        for chunk in np.array_split(np.arange(gal.size), max(1, gal.size // 400)):
            if weights is None:
                sub = SFHParams(*(getattr(p, f)[chunk] for f in p.__dataclass_fields__))
                w_chunk = star_formation_histories(sub)[0].weights
            else:
                w_chunk = weights[chunk]
            rows = gal[chunk]
            rest = spectra.rest_continuum(w_chunk, _col(t, "AV")[rows], _col(t, "SIGMA_STAR")[rows])
            lines = np.stack([_col(t, f"{ln}_Flux")[rows] for ln in spectra.LINE_NAMES], axis=1)
            for wave, out in zip(waves, outs):
                flux = spectra.observe(rest, z[rows], wave)
                spectra.add_emission_lines(flux, wave, z[rows], lines, _col(t, "SIGMA_GAS")[rows])
                out[rows] = flux
            del rest
    st = np.flatnonzero(stype == "STAR")
    qs = np.flatnonzero(stype == "QSO")
    for wave, out in zip(waves, outs):
        if st.size:
            out[st] = objects.star_spectra(wave, _col(t, "TEFF")[st], _col(t, "MAG_R")[st], z[st] * C_KMS)
        if qs.size:
            out[qs] = objects.qso_spectra(wave, z[qs], _col(t, "QSO_ALPHA")[qs], _col(t, "QSO_LINE_SCALE")[qs], _col(t, "MAG_R")[qs])
    return outs


def instrument_arms(model_brz: np.ndarray, rdata: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Apply each arm's resolution matrix to brz-grid models: {arm: (n, nwave_arm)}."""
    rdata = rdata or arm_resolution_data()
    return {arm: spectra.apply_resolution(model_brz[:, grid.arm_slice(arm)], rdata[arm]) for arm in grid.ARMS}


def stitch_arms(arms: dict[str, np.ndarray]) -> np.ndarray:
    """Arms -> brz grid, switching arm in the middle of each overlap (ARM_SWITCH)."""
    wave = grid.brz_wavelength()
    n = next(iter(arms.values())).shape[0]
    out = np.zeros((n, wave.size), dtype=np.float32)
    for arm, (lo, hi) in zip(grid.ARMS, ((0.0, ARM_SWITCH[0]), ARM_SWITCH, (ARM_SWITCH[1], 1e9))):
        sl = grid.arm_slice(arm)
        w = wave[sl]
        use = (w >= lo) & (w < hi)
        out[:, sl][:, use] = arms[arm][:, use]
    return out


def regenerate_truth_spectra(truth: Mapping[str, np.ndarray] | object, instrument: bool = True) -> np.ndarray:
    """Noise-free spectra (n, 7781) on the brz grid for rows of ``truth.parquet``.

    With ``instrument=True`` the per-arm resolution is applied and the arms are
    stitched at ``ARM_SWITCH``: the exact model the noisy coadd flux scatters
    around (up to float32 rounding). Pass a ``pyarrow.Table`` (e.g. from
    ``pq.read_table(DIR/'truth.parquet', filters=[('TARGETID', 'in', ids)])``) or a dict of arrays.
    """
    model = intrinsic_spectra(truth, grid.brz_wavelength())
    return stitch_arms(instrument_arms(model)) if instrument else model
