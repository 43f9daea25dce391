"""Orchestrate a mock survey: positions for every target, then physics and files per partition.

Only the target catalogue (a few numbers per target) and the density grid are
held for the whole survey; spectra exist for one partition (a healpix pixel of
one program) at a time and are written before the next partition starts, so
memory is bounded by the largest partition, not by N.

Every partition draws its random numbers from ``numpy.random.default_rng([seed,
program, pixel])``, so a partition's bytes depend only on the seed and on which
targets fall in it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import healpy as hp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import Table

from ard_sql import grid, paths

from . import desi_writer, field, objects, population, spectra, truth
from .ssp import C_KMS, MOCK_COSMO, REST_MIN, ssp_library

NSIDE = 64
#: Highest --zmax: DESI's blue end (3600 A) must stay inside the rest-frame SSP grid (REST_MIN).
ZMAX_LIMIT = 0.7
SURVEY = "main"
RELEASE = "mock"
TARGETID_BASE = 39_600_000_000_000_000
#: Fractions of targets: stars and QSOs are few, so that filters matter.
FRAC_STAR, FRAC_QSO, FRAC_DARK = 0.03, 0.03, 0.32
#: DESI main-survey targeting bits used here (desitarget main_cmx_or_sv masks).
DESI_LRG, DESI_QSO, DESI_BGS_ANY, DESI_MWS_ANY = 1 << 0, 1 << 2, 1 << 60, 1 << 61
BGS_FAINT, BGS_BRIGHT, MWS_BROAD = 1 << 0, 1 << 1, 1 << 0


@dataclass
class MockConfig:
    """Options of one mock survey."""

    out: Path
    """Output folder (DR1-like layout, truth.parquet, truth_spectra/)."""
    n: int
    """Number of targets (galaxies, stars and QSOs)."""
    seed: int = 0
    """Random seed: same seed, same bytes."""
    area: float | None = None
    """Footprint area in deg^2 (a spherical cap); default max(20, n / 100)."""
    zmax: float = 0.6
    """Highest galaxy redshift."""
    truth_spectra: bool = True
    """Write the noise-free spectra to truth_spectra/ (HDF5, one file per partition)."""
    resolution: bool = True
    """Write the RESOLUTION HDUs (11 x nwave floats per spectrum: most of the file size)."""
    max_cells: int = 2**22
    """Largest density grid (cells); the cell grows when the cone needs more."""
    physics: str = "realistic"
    """Galaxy physics: "realistic" (published scalings, bursts, AGN) or "prior" (the bagpipes
    layer's priors, for a simulation-based calibration of its posteriors); see ``population``."""

    def validate(self) -> None:
        """Raise ValueError with a clear message for impossible options."""
        if self.n < 1:
            raise ValueError(f"--n must be at least 1 (got {self.n})")
        if not 0.05 <= self.zmax <= ZMAX_LIMIT:
            raise ValueError(f"--zmax must lie in [0.05, {ZMAX_LIMIT}] (got {self.zmax}): the BC03 rest-frame grid starts at "
                             f"{REST_MIN:.0f} A, so DESI's 3600 A blue end is covered only up to z = {ZMAX_LIMIT}")
        if self.area is not None and not 0.1 <= self.area <= 20000:
            raise ValueError(f"--area must lie in [0.1, 20000] deg^2 (got {self.area})")
        if self.physics not in population.PHYSICS:
            raise ValueError(f"--physics must be one of {', '.join(population.PHYSICS)} (got {self.physics!r})")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0 (got {self.seed})")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} exists and is not a folder")

    @property
    def area_deg2(self) -> float:
        """Footprint area in deg^2 actually used: ``area``, else the default max(20, n / 100)."""
        return float(self.area) if self.area is not None else max(20.0, self.n / 100.0)

    def settings(self) -> dict[str, object]:
        """Every option that shapes the mock's content (recorded in ``mock.json``; ``out`` is not one).

        Two configurations with equal settings write the same bytes, so a mock on disk whose
        ``mock.json`` holds these settings can be reused instead of regenerated.
        """
        return {"n": int(self.n), "seed": int(self.seed), "area_deg2": self.area_deg2, "zmax": float(self.zmax),
                "truth_spectra": bool(self.truth_spectra), "resolution": bool(self.resolution),
                "max_cells": int(self.max_cells), "physics": str(self.physics)}


def build_catalog(cfg: MockConfig) -> tuple[dict[str, np.ndarray], field.CosmicWeb]:
    """Positions, redshifts, environment and sample of every target (no spectra)."""
    rng = np.random.default_rng([cfg.seed, 0])
    geom = field.ConeGeometry(cfg.area_deg2, cfg.zmax)
    web = field.build_cosmic_web(geom, rng, max_cells=cfg.max_cells)
    n_star = int(round(cfg.n * FRAC_STAR))
    n_qso = int(round(cfg.n * FRAC_QSO))
    n_dark = int(round(cfg.n * FRAC_DARK)) if cfg.zmax > 0.35 else 0
    n_bright = cfg.n - n_star - n_qso - n_dark
    parts = []
    for sample, count, bias in (("bright", n_bright, 1.3), ("dark", n_dark, 2.0)):
        if count <= 0:
            continue
        g = field.sample_galaxies(web, geom, lambda z, s=sample: population.number_density(z, s), bias, count, rng)
        g["SAMPLE"] = np.full(count, sample)
        g["SPECTYPE"] = np.full(count, "GALAXY")
        parts.append(g)
    for stype, count in (("STAR", n_star), ("QSO", n_qso)):
        if count <= 0:
            continue
        # Uniform on the cap, outside the cosmic web.
        cos_t = 1.0 - rng.random(count) * (1.0 - np.cos(geom.theta))
        phi = rng.random(count) * 2 * np.pi
        sin_t = np.sqrt(1 - cos_t**2)
        pos = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=1)
        ra, dec = geom.to_radec(pos)
        z = rng.normal(0, 1e-4, count) if stype == "STAR" else rng.uniform(0.5, 3.0, count)
        nan = np.full(count, np.nan)
        parts.append({"RA": ra, "DEC": dec, "Z_COSMO": z, "Z_OBS": z, "X": nan, "Y": nan, "Z_COMOVING": nan, "DELTA": nan,
                      "WEB_CLASS": np.full(count, -1, dtype=np.int8), "V_LOS": z * C_KMS if stype == "STAR" else np.zeros(count), "V_LOS_FLOW": np.zeros(count),
                      "SAMPLE": np.full(count, "bright" if stype == "STAR" else "dark"), "SPECTYPE": np.full(count, stype)})
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cat["TARGETID"] = TARGETID_BASE + np.arange(cfg.n, dtype=np.int64)
    cat["HEALPIX"] = hp.ang2pix(NSIDE, cat["RA"], cat["DEC"], nest=True, lonlat=True).astype(np.int64)
    return cat, web


def _partition_rows(cat: dict[str, np.ndarray]) -> list[tuple[str, int, np.ndarray]]:
    """(program, pixel, row indices) for every partition, in a fixed order."""
    out = []
    for program in ("bright", "dark"):
        sel = np.flatnonzero(cat["SAMPLE"] == program)
        for pix in np.unique(cat["HEALPIX"][sel]):
            out.append((program, int(pix), sel[cat["HEALPIX"][sel] == pix]))
    return out


def _wise_mags(weights: np.ndarray, av: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    """W1/W2 AB magnitudes from the raw-resolution SSP grid (rest near-infrared)."""
    lib = ssp_library()
    cols = np.flatnonzero((lib.raw_wave > 15000) & (lib.raw_wave < 60000))
    rest = weights.astype(np.float32) @ lib.raw_binned[:, cols]
    scale = spectra.L_SUN_ERG_S / (4 * np.pi * spectra.luminosity_distance_cm(z) ** 2 * (1 + z)) / 1e-17
    out = {}
    for band in ("W1", "W2"):
        c, s = objects.BANDS[band]
        wobs = np.linspace(c - 2.5 * s, c + 2.5 * s, 25)
        f = np.stack([np.interp(wobs / (1 + zi), lib.raw_wave[cols], r) for zi, r in zip(z, rest)]) * scale[:, None]
        out[band] = objects.ab_mag(wobs, f, band)
    return out


def _physics(cat: dict[str, np.ndarray], rows: np.ndarray, program: str, rng: np.random.Generator,
             physics: str = "realistic") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Truth columns of one partition (everything the spectra are built from) and the noise-free brz-grid models."""
    n = rows.size
    t: dict[str, np.ndarray] = {k: cat[k][rows] for k in ("TARGETID", "RA", "DEC", "Z_COSMO", "V_LOS", "V_LOS_FLOW", "HEALPIX", "SPECTYPE", "DELTA", "WEB_CLASS")}
    t["Z"] = cat["Z_OBS"][rows]
    t["CX"], t["CY"], t["CZ"] = cat["X"][rows], cat["Y"][rows], cat["Z_COMOVING"][rows]
    nan = np.full(n, np.nan)
    for c in ("LOG_MASS", "LOG_MASS_FORMED", "SFR", "SSFR", "AGE_MW", "AV", "AV_GAS", "METALLICITY", "TAU", "SFH_AGE", "BURST_FRAC",
              "BURST_AGE", "BURST_TAU", "TRUNC_AGE", "T_QUENCH", "T_QUENCH_COSMIC", "SIGMA_STAR", "SIGMA_GAS", "OH_GAS",
              "AGE_UNIVERSE", "TEFF", "QSO_ALPHA", "QSO_LINE_SCALE", *[f"{ln}_Flux" for ln in spectra.LINE_NAMES],
              *[f"MAG_{b}" for b in objects.BANDS]):
        t[c] = nan.copy()
    t["FIBER_FRAC"] = np.full(n, 0.75)
    t["POPULATION"] = np.where(t["SPECTYPE"] == "STAR", "star", "qso").astype("<U16")
    gal = np.flatnonzero(t["SPECTYPE"] == "GALAXY")
    phot_wave = objects.PHOT_WAVE
    gal_weights = None
    if gal.size:
        g = population.galaxy_population(t["Z"][gal], t["WEB_CLASS"][gal], t["DELTA"][gal], program, rng, physics)
        t["POPULATION"][gal] = g.population
        vals = {"LOG_MASS": g.log_mass, "LOG_MASS_FORMED": g.sfh.massformed, "SFR": g.sfr, "SSFR": g.ssfr, "AGE_MW": g.mass_weighted_age,
                "AV": g.av, "AV_GAS": g.av_gas, "METALLICITY": g.sfh.metallicity, "TAU": g.sfh.tau, "SFH_AGE": g.sfh.age,
                "BURST_FRAC": g.sfh.burst_frac, "BURST_AGE": g.sfh.burst_age, "BURST_TAU": g.sfh.burst_tau, "TRUNC_AGE": g.sfh.trunc_age,
                "T_QUENCH": g.t_quench, "T_QUENCH_COSMIC": g.t_quench_cosmic, "SIGMA_STAR": g.sigma_star, "SIGMA_GAS": g.sigma_gas,
                "OH_GAS": g.gas_oh, "AGE_UNIVERSE": g.sfh.age_of_universe, "FIBER_FRAC": g.fiber_frac}
        for k, v in vals.items():
            t[k][gal] = v
        for j, ln in enumerate(spectra.LINE_NAMES):
            t[f"{ln}_Flux"][gal] = g.line_flux[:, j]
        gal_weights = g.weights
        wise = _wise_mags(g.weights, g.av, t["Z"][gal])
        t["MAG_W1"][gal], t["MAG_W2"][gal] = wise["W1"], wise["W2"]
    st = np.flatnonzero(t["SPECTYPE"] == "STAR")
    t["TEFF"][st] = rng.uniform(3800, 8500, st.size)
    t["MAG_R"][st] = rng.uniform(16.0, 19.0, st.size)
    qs = np.flatnonzero(t["SPECTYPE"] == "QSO")
    t["QSO_ALPHA"][qs] = rng.normal(-0.5, 0.3, qs.size)
    t["QSO_LINE_SCALE"][qs] = rng.lognormal(0.0, 0.3, qs.size)
    t["MAG_R"][qs] = rng.uniform(19.0, 21.5, qs.size)
    # Optical photometry of every object from its own noise-free spectrum on a wider grid; the
    # brz-grid model comes from the same rest-frame continuum (computed once per galaxy).
    phot, model = truth.intrinsic_spectra_grids(t, [phot_wave, grid.brz_wavelength()], weights=gal_weights)
    for b in ("G", "R", "Z"):
        t[f"MAG_{b}"] = objects.ab_mag(phot_wave, phot, b)
    for b in ("W1", "W2"):  # stars and QSOs: Rayleigh-Jeans / power-law extrapolation from z
        miss = ~np.isfinite(t[f"MAG_{b}"])
        t[f"MAG_{b}"][miss] = t["MAG_Z"][miss] + np.where(t["SPECTYPE"][miss] == "QSO", -1.0, 0.6)
    return t, model


def _target_bits(t: dict[str, np.ndarray], program: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = t["TARGETID"].size
    desi, bgs, mws = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    gal = t["SPECTYPE"] == "GALAXY"
    r = t["MAG_R"]
    if program == "bright":
        bgs[gal & (r < 19.5)] |= BGS_BRIGHT
        bgs[gal & (r >= 19.5)] |= BGS_FAINT
        desi[gal] |= DESI_BGS_ANY
        mws[t["SPECTYPE"] == "STAR"] |= MWS_BROAD
        desi[t["SPECTYPE"] == "STAR"] |= DESI_MWS_ANY
    else:
        desi[gal] |= DESI_LRG
        desi[t["SPECTYPE"] == "QSO"] |= DESI_QSO
    return desi, bgs, mws


def _fibermap(t: dict[str, np.ndarray], program: str, rng: np.random.Generator) -> Table:
    n = t["TARGETID"].size
    fm = Table()
    fm["TARGETID"] = t["TARGETID"].astype(np.int64)
    fm["COADD_FIBERSTATUS"] = np.zeros(n, np.int32)
    fm["TARGET_RA"], fm["TARGET_DEC"] = t["RA"].astype(np.float64), t["DEC"].astype(np.float64)
    fm["OBJTYPE"] = np.full(n, "TGT")
    fm["PHOTSYS"] = np.where(t["DEC"] > 32.375, "N", "S")
    for b in ("G", "R", "Z", "W1", "W2"):
        true_flux = objects.mag_to_nanomaggy(t[f"MAG_{b}"])
        err = np.full(n, {"G": 0.05, "R": 0.04, "Z": 0.08, "W1": 0.3, "W2": 0.8}[b])
        fm[f"FLUX_{b}"] = (true_flux + err * rng.standard_normal(n)).astype(np.float32)
        fm[f"FLUX_IVAR_{b}"] = (1.0 / err**2).astype(np.float32)
    fm["FIBERFLUX_R"] = (objects.mag_to_nanomaggy(t["MAG_R"]) * t["FIBER_FRAC"]).astype(np.float32)
    fm["EBV"] = np.full(n, 0.03, np.float32)  # fluxes are not reddened by the Milky Way in the mock
    desi, bgs, mws = _target_bits(t, program)
    fm["DESI_TARGET"], fm["BGS_TARGET"], fm["MWS_TARGET"], fm["SCND_TARGET"] = desi, bgs, mws, np.zeros(n, np.int64)
    fm["COADD_NUMEXP"] = np.full(n, 2 if program == "bright" else 4, np.int16)
    fm["COADD_EXPTIME"] = np.full(n, spectra.PROGRAMS[program]["exptime"], np.float32)
    return fm


def _redshifts(t: dict[str, np.ndarray], rng: np.random.Generator) -> Table:
    n = t["TARGETID"].size
    z = t["Z"].astype(np.float64)
    zerr = np.where(t["SPECTYPE"] == "QSO", 3e-4, 3e-5) * (1 + z)
    zrr = z + zerr * rng.standard_normal(n)
    fail = rng.random(n) < 0.01  # catastrophic failures, flagged like redrock's SMALL_DELTA_CHI2
    zrr = np.where(fail, rng.uniform(0.0, 1.6, n), zrr)
    rr = Table()
    rr["TARGETID"] = t["TARGETID"].astype(np.int64)
    rr["CHI2"] = rng.normal(7781, 120, n)
    rr["COEFF"] = np.zeros((n, 10))
    rr["Z"], rr["ZERR"] = zrr, zerr
    rr["ZWARN"] = np.where(fail, 4, 0).astype(np.int64)
    rr["NPIXELS"] = np.full(n, 7781, np.int64)
    rr["SPECTYPE"] = t["SPECTYPE"].astype("<U6")
    rr["SUBTYPE"] = np.full(n, "", dtype="<U20")
    rr["NCOEFF"] = np.where(t["SPECTYPE"] == "GALAXY", 10, 4).astype(np.int64)
    rr["DELTACHI2"] = np.where(fail, rng.uniform(0, 9, n), 10 ** rng.uniform(2, 4, n))
    return rr


def _tsnr2(t: dict[str, np.ndarray], program: str, rng: np.random.Generator) -> Table:
    n = t["TARGETID"].size
    base = {"bright": {"BGS": 1100, "LRG": 30, "ELG": 60, "QSO": 20, "LYA": 0.5},
            "dark": {"BGS": 4500, "LRG": 90, "ELG": 110, "QSO": 30, "LYA": 1.5}}[program]
    ts = Table()
    ts["TARGETID"] = t["TARGETID"].astype(np.int64)
    for k, v in base.items():
        ts[f"TSNR2_{k}"] = (v * rng.lognormal(0, 0.1, n)).astype(np.float32)
    return ts


def generate_partition(cat: dict[str, np.ndarray], program: str, pixel: int, rows: np.ndarray, cfg: MockConfig,
                       rdata: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Physics, spectra and files of one partition; returns its truth columns."""
    rng = np.random.default_rng([cfg.seed, 1 if program == "bright" else 2, pixel])
    t, model = _physics(cat, rows, program, rng, cfg.physics)
    t["SURVEY"] = np.full(rows.size, SURVEY)
    t["PROGRAM"] = np.full(rows.size, program)
    t["SAMPLE"] = np.full(rows.size, program)
    arms_model = truth.instrument_arms(model, rdata)
    arms = {}
    for arm, m in arms_model.items():
        flux, ivar, mask = spectra.add_noise(m, grid.arm_wavelength(arm), program, t["FIBER_FRAC"], rng)
        arms[arm] = {"wave": grid.arm_wavelength(arm), "flux": flux, "ivar": ivar, "mask": mask,
                     "resolution": np.broadcast_to(rdata[arm], (rows.size,) + rdata[arm].shape)}
    fm = _fibermap(t, program, rng)
    header = {"SPGRP": "healpix", "SPGRPVAL": pixel, "SURVEY": SURVEY, "PROGRAM": program, "HPXPIXEL": pixel,
              "HPXNSIDE": NSIDE, "HPXNEST": True, "MOCKSEED": cfg.seed}
    desi_writer.write_coadd(desi_writer.coadd_path(cfg.out, SURVEY, program, pixel), fm, arms, header, resolution=cfg.resolution)
    rr = _redshifts(t, rng)
    desi_writer.write_redrock(desi_writer.redrock_path(cfg.out, SURVEY, program, pixel), rr, fm, _tsnr2(t, program, rng),
                              header={"RRVER": "mock", "SPGRP": "healpix", "SPGRPVAL": pixel})
    if cfg.truth_spectra:
        _write_truth_spectra(cfg.out, program, pixel, t["TARGETID"], truth.stitch_arms(arms_model))
    t["ZRR"], t["ZWARN"], t["DESI_TARGET"], t["BGS_TARGET"] = rr["Z"].data, rr["ZWARN"].data, fm["DESI_TARGET"].data, fm["BGS_TARGET"].data
    return t


def truth_spectra_path(out: Path | str, program: str, pixel: int) -> Path:
    """HDF5 file with the noise-free spectra (instrument resolution, brz grid) of one partition."""
    return Path(out) / "truth_spectra" / f"{SURVEY}-{program}-{int(pixel)}.h5"


def _write_truth_spectra(out: Path, program: str, pixel: int, targetid: np.ndarray, flux: np.ndarray) -> None:
    import h5py

    path = truth_spectra_path(out, program, pixel)
    with paths.atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.attrs["units"] = "1e-17 erg/(s cm2 Angstrom)"
        f.attrs["description"] = "noise-free model at instrument resolution on the brz grid (ard_sql.grid)"
        f.create_dataset("targetid", data=np.asarray(targetid, dtype=np.int64))
        f.create_dataset("flux", data=flux.astype(np.float32), chunks=(1, flux.shape[1]), compression="gzip", compression_opts=4, shuffle=True)


TRUTH_ORDER = ["TARGETID", "RA", "DEC", "Z", "Z_COSMO", "V_LOS", "V_LOS_FLOW", "CX", "CY", "CZ", "HEALPIX", "SURVEY", "PROGRAM", "SAMPLE", "SPECTYPE",
               "POPULATION", "LOG_MASS", "LOG_MASS_FORMED", "SFR", "SSFR", "AGE_MW", "AV", "AV_GAS", "METALLICITY", "TAU", "SFH_AGE",
               "BURST_FRAC", "BURST_AGE", "BURST_TAU", "TRUNC_AGE", "AGE_UNIVERSE", "T_QUENCH", "T_QUENCH_COSMIC", "SIGMA_STAR",
               "SIGMA_GAS", "OH_GAS", "FIBER_FRAC", *[f"{ln}_Flux" for ln in spectra.LINE_NAMES], "DELTA", "WEB_CLASS",
               *[f"MAG_{b}" for b in objects.BANDS], "TEFF", "QSO_ALPHA", "QSO_LINE_SCALE", "ZRR", "ZWARN", "DESI_TARGET", "BGS_TARGET"]


def _truth_table(t: dict[str, np.ndarray]) -> pa.Table:
    cols = {}
    for k in TRUTH_ORDER:
        v = np.asarray(t[k])
        if v.dtype.kind == "U":
            cols[k] = pa.array(v.tolist(), pa.string())
        elif k == "WEB_CLASS":
            cols[k] = pa.array(np.where(v < 0, 0, v).astype(np.int8), mask=v < 0)
        else:
            cols[k] = pa.array(v)
    fields = [pa.field(k, cols[k].type, metadata={"unit": truth.TRUTH_UNITS.get(k, "")}) for k in TRUTH_ORDER]
    return pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields))


def run_mock(cfg: MockConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Generate the whole mock survey into ``cfg.out``; returns a summary.

    ``progress(done_targets, total_targets)`` is called after each partition.
    """
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cat, web = build_catalog(cfg)
    rdata = truth.arm_resolution_data()
    parts = _partition_rows(cat)
    writer = None
    zcat_parts = []
    done = 0
    # truth.parquet appears whole or not at all (a failed run leaves no temporary behind)
    with paths.atomic_path(out / "truth.parquet") as tmp_truth:
        try:
            for program, pixel, rows in parts:
                t = generate_partition(cat, program, pixel, rows, cfg, rdata)
                table = _truth_table(t)
                if writer is None:
                    meta = {"DELTA_SMOOTHING_MPC": str(web.smoothing_mpc), "TWEB_LAMBDA_TH": str(web.lambda_th),
                            "GRID_CELL_MPC": f"{web.cell:.4f}", "SEED": str(cfg.seed), "AREA_DEG2": str(cfg.area_deg2),
                            "ZMAX": str(cfg.zmax), "COSMOLOGY": "FlatLambdaCDM(H0=70, Om0=0.3), sigma8=0.8, ns=0.965, Ob0=0.048"}
                    schema = table.schema.with_metadata({k.encode(): v.encode() for k, v in meta.items()})
                    writer = pq.ParquetWriter(tmp_truth, schema, compression="zstd")
                writer.write_table(table.cast(writer.schema))
                zc = Table()
                zc["TARGETID"] = t["TARGETID"]
                zc["SURVEY"], zc["PROGRAM"] = t["SURVEY"].astype("<U7"), t["PROGRAM"].astype("<U6")
                zc["HEALPIX"] = np.full(rows.size, pixel, np.int32)
                zc["TARGET_RA"], zc["TARGET_DEC"] = t["RA"], t["DEC"]
                zc["Z"], zc["ZWARN"] = t["ZRR"], t["ZWARN"].astype(np.int64)
                zc["SPECTYPE"] = t["SPECTYPE"].astype("<U6")
                zc["DESI_TARGET"], zc["BGS_TARGET"] = t["DESI_TARGET"], t["BGS_TARGET"]
                zc["ZCAT_PRIMARY"] = np.ones(rows.size, bool)
                zc["ZCAT_NSPEC"] = np.ones(rows.size, np.int16)
                zcat_parts.append(zc)
                done += rows.size
                if progress is not None:
                    progress(done, cfg.n)
        finally:
            if writer is not None:
                writer.close()
    from astropy.table import vstack

    zcat = vstack(zcat_parts)
    desi_writer.write_zcatalog(desi_writer.zcatalog_path(out, RELEASE), zcat, header={"RELEASE": RELEASE})
    summary = {**cfg.settings(), "partitions": len(parts), "grid_cell_mpc": web.cell, "grid_shape": list(web.shape)}
    # written last and atomically: its presence marks a finished mock (``ard demo`` reuses it)
    paths.atomic_write_text(out / "mock.json", json.dumps(summary, indent=1, sort_keys=True))
    return summary
