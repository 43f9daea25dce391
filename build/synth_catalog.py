"""A catalog-only ARD of any size, to exercise the query path at DR1 scale.

Every column of the contract is filled with plausible, mutually consistent
values (no spectra; embeddings optional), and written through the SAME
writers as a real build (``ard_sql.build.hats_writer`` for the HATS staging
tables, ``ard_sql.build.database`` for ``ard.duckdb``). Memory is bounded by
one partition: the survey is generated partition by partition.

The galaxy model (per target, vectorised):

- a DESI-like footprint (Dec > -20 deg, |b| > 20 deg), uniform on the sky
  within it; target classes BGS / LRG / ELG with their redshift ranges;
- a population label: star-forming, green-valley, quiescent, post-starburst,
  green pea, and "red misfit" (a quiescent galaxy whose Bagpipes age was
  drawn young, i.e. in tension with its Dn4000); the labels are written to
  ``artifacts/synth/truth.parquet`` so the case-study views can be scored;
- Dn4000, HdeltaA, the Lick indices, mass, SFR, age, t_quench, line fluxes,
  velocity dispersion and the cosmic-web columns drawn from that label with
  scatter, so that e.g. a green-valley cut on Dn4000 picks mostly green-valley
  galaxies, as in real data.

Nothing here is measured: ``Physics_Source`` is ``'synthetic'`` on every row
(never ``'amortized'`` or ``'bagpipes'``), ``ard_meta`` records the source as
``ard synth-catalog (no spectra)``, and the ``*_flag`` columns are 0 because no
fit was attempted, not because one succeeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import healpy as hp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ard_sql import contract, paths
from ard_sql.build import compaction, database, hats_writer

POPULATIONS = ["star_forming", "green_valley", "quiescent", "post_starburst", "green_pea", "red_misfit"]
_TARGET_ID0 = 39_627_000_000_000_000  # synthetic ids in DESI's TARGETID range


@dataclass
class SynthOptions:
    """Options of :func:`synth_catalog`."""

    n: int = 100_000
    """Number of targets (rows of the core table)."""
    order: int = 3
    """HEALPix order of the partitions (3: ~54 deg^2, ~260 partitions in the footprint)."""
    seed: int = 42
    """Random seed; the same seed gives the same catalog."""
    embed_fraction: float = 0.0
    """Fraction of partitions that get embedding vectors (0: no embed layer; 1: every row)."""
    layers: tuple[str, ...] = ("lick", "ppxf", "bagpipes", "embed", "topology")
    """Layers to write besides core."""
    compact: bool = True
    """Also write the compacted table (``build/compaction.py``), as a build does."""


def footprint_pixels(order: int) -> np.ndarray:
    """NESTED pixels at ``order`` whose centre is in the footprint (Dec > -20, |b| > 20 deg)."""
    npix = hp.nside2npix(2**order)
    ra, dec = hp.pix2ang(2**order, np.arange(npix), nest=True, lonlat=True)
    b = _galactic_latitude(ra, dec)
    return np.flatnonzero((dec > -20) & (np.abs(b) > 20))


def _galactic_latitude(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    rot = hp.Rotator(coord=["C", "G"])
    _, lat = rot(ra, dec, lonlat=True)
    return lat


def _positions_in_pixel(rng: np.random.Generator, order: int, pixel: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positions inside one pixel (random order-29 sub-pixels; pixels are equal-area)."""
    shift = 2 * (29 - order)
    sub = rng.integers(0, 1 << shift, size=n, dtype=np.int64)
    ipix = (np.int64(pixel) << shift) + sub
    ra, dec = hp.pix2ang(2**29, ipix, nest=True, lonlat=True)
    return ra, dec


def _zdist(rng: np.random.Generator, cls: np.ndarray) -> np.ndarray:
    z = np.empty(len(cls))
    for name, (lo, hi, mode) in {"BGS": (0.01, 0.45, 0.18), "LRG": (0.35, 1.0, 0.7), "ELG": (0.6, 1.6, 1.0)}.items():
        m = cls == name
        z[m] = rng.triangular(lo, mode, hi, m.sum())
    return z


def _luminosity_distance_cm(z: np.ndarray) -> np.ndarray:
    from astropy.cosmology import Planck18

    grid = np.linspace(0.0, 2.0, 401)
    dl = Planck18.luminosity_distance(grid).to("cm").value
    return np.interp(z, grid, dl)


def _lookback_gyr(z: np.ndarray) -> np.ndarray:
    from astropy.cosmology import Planck18

    grid = np.linspace(0.0, 2.0, 401)
    return np.interp(z, grid, Planck18.lookback_time(grid).to("Gyr").value)


def simulate_partition(rng: np.random.Generator, order: int, pixel: int, n: int, first_id: int) -> dict[str, np.ndarray]:
    """Physical quantities of ``n`` synthetic galaxies in one partition (a dict of arrays)."""
    ra, dec = _positions_in_pixel(rng, order, pixel, n)
    cls = rng.choice(np.array(["BGS", "LRG", "ELG"]), size=n, p=[0.55, 0.25, 0.20])
    z = _zdist(rng, cls)
    web = rng.choice(4, size=n, p=[0.15, 0.35, 0.38, 0.12])
    mass = np.where(cls == "LRG", rng.normal(11.2, 0.3, n), np.where(cls == "ELG", rng.normal(9.9, 0.4, n), rng.normal(10.3, 0.6, n)))
    # quenched fraction rises with mass and with environment (Knot > Filament > Sheet > Void)
    env_boost = np.array([-0.6, 0.0, 0.3, 0.8])[web]
    p_q = 1 / (1 + np.exp(-(3.0 * (mass - 10.7) + env_boost)))
    p_q = np.where(cls == "ELG", 0.02, np.where(cls == "LRG", 0.9, p_q))
    u = rng.random(n)
    pop = np.where(u < p_q, 2, 0)  # quiescent or star-forming
    gv = (rng.random(n) < 0.18) & (cls != "ELG")
    pop = np.where(gv, 1, pop)
    psb = (rng.random(n) < 0.01) & (cls == "BGS")
    pop = np.where(psb, 3, pop)
    pea = (rng.random(n) < 0.004) & (cls != "LRG") & (z > 0.05) & (z < 0.4)
    pop = np.where(pea, 4, pop)
    misfit = (pop == 2) & (rng.random(n) < 0.03)
    pop = np.where(misfit, 5, pop)
    mass = np.where(pop == 4, rng.normal(9.0, 0.3, n), mass)

    dn4000 = np.choose(pop, [rng.normal(1.22, 0.08, n), rng.normal(1.50, 0.07, n), rng.normal(1.85, 0.10, n),
                             rng.normal(1.32, 0.07, n), rng.normal(1.05, 0.05, n), rng.normal(1.88, 0.08, n)])
    hdelta = np.choose(pop, [rng.normal(4.0, 1.5, n), rng.normal(1.5, 1.2, n), rng.normal(-1.5, 1.0, n),
                             rng.normal(7.0, 0.9, n), rng.normal(5.0, 1.5, n), rng.normal(-1.6, 0.9, n)])
    universe = 13.8 - _lookback_gyr(z)
    # Dn4000 age (empirical): a smooth monotonic relation; Bagpipes age follows it except for misfits
    age_dn = np.clip(10 ** (1.6 * (dn4000 - 1.0) - 0.45), 0.05, universe)
    age = np.clip(age_dn * 10 ** rng.normal(0, 0.08, n), 0.05, universe)
    age = np.where(pop == 5, np.clip(rng.uniform(0.3, 1.5, n), 0.05, universe), age)
    ssfr_ms = -9.7 + 0.8 * np.log10(1 + z) - 0.2 * (mass - 10)
    ssfr = np.choose(pop, [ssfr_ms + rng.normal(0, 0.3, n), ssfr_ms - 1.0 + rng.normal(0, 0.3, n), ssfr_ms - 2.5 + rng.normal(0, 0.4, n),
                           ssfr_ms - 1.8 + rng.normal(0, 0.3, n), ssfr_ms + 1.0 + rng.normal(0, 0.2, n), ssfr_ms - 2.5 + rng.normal(0, 0.4, n)])
    sfr = 10 ** (ssfr + mass)
    quenched = np.isin(pop, [1, 2, 3, 5])
    # t_quench (lookback, Gyr): shorter in dense environments at fixed mass (the case-study signal)
    tq = np.where(quenched, np.clip(rng.normal(2.5, 0.8, n) - 0.35 * web + 0.3 * (mass - 10.5), 0.1, universe), np.nan)
    tq = np.where(pop == 3, rng.uniform(0.1, 1.0, n), tq)
    dl = _luminosity_distance_cm(np.maximum(z, 1e-3))
    halpha = sfr * 1.26e41 / (4 * np.pi * dl**2) / 1e-17 * 10 ** rng.normal(0, 0.1, n)
    o3_ratio = np.where(pop == 4, rng.normal(0.75, 0.1, n), rng.normal(-0.3, 0.3, n))
    return {
        "TargetID": first_id + np.arange(n, dtype=np.int64), "RA": ra, "DEC": dec, "Z": z, "cls": cls, "pop": pop,
        "web": web, "mass": mass, "sfr": sfr, "ssfr": ssfr, "age": age, "age_dn": age_dn, "tq": tq,
        "dn4000": dn4000, "hdelta": hdelta, "halpha": halpha, "o3_ratio": o3_ratio, "universe": universe,
    }


def _err(rng: np.random.Generator, x: np.ndarray, frac: float, floor: float) -> np.ndarray:
    return np.abs(x) * frac + floor * (0.5 + rng.random(len(x)))


def _core(rng: np.random.Generator, g: dict[str, np.ndarray], order: int, pixel: int) -> dict[str, np.ndarray]:
    n = len(g["Z"])
    snr = 10 ** rng.normal(0.7, 0.35, n)
    mag_r = 17.5 + 2.5 * np.log10(np.maximum(g["Z"], 0.01) / 0.1) * 2 - (g["mass"] - 10.3)
    flux_r = 10 ** (-0.4 * (mag_r - 22.5))
    cols = {
        "TargetID": g["TargetID"], "RA": g["RA"], "DEC": g["DEC"], "Z": g["Z"],
        "ZERR": 1e-5 * (1 + g["Z"]) * (1 + 5 / snr), "ZWARN": np.where(rng.random(n) < 0.02, 4, 0),
        "CHI2": rng.normal(7781, 150, n), "DELTACHI2": 10 ** rng.normal(2.5, 0.6, n),
        "SPECTYPE": np.full(n, "GALAXY", dtype=object), "SUBTYPE": np.full(n, "", dtype=object),
        "SURVEY": np.full(n, "main", dtype=object),
        "PROGRAM": np.where(g["cls"] == "BGS", "bright", "dark").astype(object),
        "HEALPIX": hp.ang2pix(64, g["RA"], g["DEC"], nest=True, lonlat=True),
        "EBV": np.abs(rng.normal(0.03, 0.02, n)),
        "DESI_TARGET": np.choose(np.searchsorted(["BGS", "ELG", "LRG"], g["cls"]), [1 << 60, 1 << 1, 1 << 0]),
        "BGS_TARGET": np.where(g["cls"] == "BGS", 2, 0), "MWS_TARGET": np.zeros(n, np.int64), "SCND_TARGET": np.zeros(n, np.int64),
        "TARGET_CLASS": g["cls"].astype(object),
        "SNR_Median": snr, "SNR_B": snr * rng.uniform(0.5, 0.9, n), "SNR_R": snr * rng.uniform(0.9, 1.2, n), "SNR_Z": snr * rng.uniform(0.8, 1.3, n),
        "N_SPECTRA": np.ones(n, np.int16), "SPEC_FILE": np.full(n, None, dtype=object), "SPEC_ROW": np.full(n, None, dtype=object),
        "SOURCE_FILE": np.full(n, "synthetic (ard synth-catalog)", dtype=object),
    }
    colour = {"G": -0.4 - 0.6 * (g["dn4000"] - 1.2), "R": 0.0, "Z": 0.4 + 0.3 * (g["dn4000"] - 1.2), "W1": 0.7, "W2": 0.6}
    for band, c in colour.items():
        f = flux_r * 10 ** (0.4 * c) * 10 ** rng.normal(0, 0.03, n)
        cols[f"FLUX_{band}"] = f
        cols[f"FLUX_IVAR_{band}"] = 1 / (0.02 * f + 0.05) ** 2
    for t in ("BGS", "LRG", "ELG", "QSO", "LYA"):
        cols[f"TSNR2_{t}"] = snr**2 * rng.uniform(5, 50, n)
    return cols


def _lick(rng: np.random.Generator, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(g["Z"])
    old = np.clip((g["dn4000"] - 1.1) / 0.8, 0, 1)
    vals = {
        "Dn4000": g["dn4000"], "D4000": 1.05 * g["dn4000"] + rng.normal(0.05, 0.03, n), "Hdelta_A": g["hdelta"],
        "Hgamma_A": 1.1 * g["hdelta"] - 1.5 + rng.normal(0, 0.8, n), "Fe4383": 1.5 + 4 * old + rng.normal(0, 0.8, n),
        "Mgb": 1.5 + 3 * old + rng.normal(0, 0.4, n), "Fe5270": 1.8 + 1.3 * old + rng.normal(0, 0.3, n),
        "Fe5335": 1.5 + 1.2 * old + rng.normal(0, 0.3, n),
    }
    vals["Fe_mean"] = (vals["Fe5270"] + vals["Fe5335"]) / 2
    vals["MgFe_prime"] = np.sqrt(np.maximum(vals["Mgb"] * (0.72 * vals["Fe5270"] + 0.28 * vals["Fe5335"]), 0))
    out = {"TargetID": g["TargetID"]}
    for k, v in vals.items():
        out[k] = v
        out[f"{k}_err"] = _err(rng, v, 0.03, 0.05)
    out["Lick_flag"] = np.zeros(n, np.int32)
    return out


def _ppxf(rng: np.random.Generator, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(g["Z"])
    ha = g["halpha"]
    hb = ha / 2.86 / 10 ** rng.uniform(0, 0.2, n)  # Balmer decrement with dust
    lines = {
        "OII_3726": 0.6 * ha, "OII_3729": 0.8 * ha, "Hdelta": 0.26 * hb, "Hgamma": 0.47 * hb, "Hbeta": hb,
        "OIII_5007": hb * 10 ** g["o3_ratio"], "NII_6584": ha * 10 ** np.where(g["pop"] == 4, -1.2, rng.normal(-0.45, 0.15, n)),
        "Halpha": ha, "SII_6716": 0.15 * ha, "SII_6731": 0.11 * ha,
    }
    lines["OIII_4959"] = lines["OIII_5007"] / 2.98
    lines["NII_6548"] = lines["NII_6584"] / 3.05
    out: dict[str, np.ndarray] = {"TargetID": g["TargetID"]}
    sigma = 10 ** (2.2 + 0.3 * (g["mass"] - 11) + rng.normal(0, 0.05, n))
    kin = {"VelDisp": sigma, "V_star": rng.normal(0, 20, n), "V_gas_balmer": rng.normal(0, 25, n),
           "Sigma_gas_balmer": 10 ** rng.normal(1.9, 0.15, n), "V_gas_forbidden": rng.normal(0, 25, n),
           "Sigma_gas_forbidden": 10 ** rng.normal(1.9, 0.15, n)}
    for k, v in kin.items():
        out[k] = v
        out[f"{k}_err"] = _err(rng, v, 0.05, 3.0)
    for line in contract.PPXF_LINES:
        v = lines[line] * 10 ** rng.normal(0, 0.05, n)
        out[f"{line}_Flux"] = v
        out[f"{line}_Flux_err"] = _err(rng, v, 0.05, 1.0)
    out["Gas_Av"] = np.clip(1.97 * 2.5 * np.log10(np.maximum(ha / hb, 2.86) / 2.86) / 1.27, 0, None)
    out["Gas_Av_err"] = _err(rng, out["Gas_Av"], 0.1, 0.05)
    out["PPXF_Chi2"] = rng.normal(1.05, 0.08, n)
    out["PPXF_mode"] = np.full(n, "fast", dtype=object)
    out["PPXF_flag"] = np.zeros(n, np.int32)
    return out


def _bagpipes(rng: np.random.Generator, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(g["Z"])
    med = {"LogMass": g["mass"], "SFR": g["sfr"], "sSFR": g["ssfr"], "Age": g["age"],
           "Dust_Av": np.abs(rng.normal(0.4, 0.3, n)), "Metallicity": 10 ** rng.normal(0, 0.2, n),
           "Tau": 10 ** rng.normal(0.3, 0.3, n), "t_quench": g["tq"]}
    width = {"LogMass": 0.08, "SFR": 0.3, "sSFR": 0.25, "Age": 0.15, "Dust_Av": 0.1, "Metallicity": 0.2, "Tau": 0.3, "t_quench": 0.2}
    out: dict[str, np.ndarray] = {"TargetID": g["TargetID"]}
    for k, v in med.items():
        w = width[k] * rng.uniform(0.6, 1.4, n)
        if k in ("SFR", "Age", "Metallicity", "Tau", "t_quench"):  # skewed, positive: width in dex
            lo, hi = v / 10**w, v * 10**w
        else:
            lo, hi = v - w, v + w
        out[f"{k}_p16"], out[f"{k}_p50"], out[f"{k}_p84"] = lo, v, hi
    out["Physics_Source"] = np.full(n, "synthetic", dtype=object)  # drawn, not fitted: say so on every row
    out["Bagpipes_flag"] = np.zeros(n, np.int32)
    return out


def _topology(rng: np.random.Generator, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(g["Z"])
    web = g["web"]
    s5 = 10 ** (np.array([-1.2, -0.6, -0.1, 0.6])[web] + rng.normal(0, 0.3, n))
    return {
        "TargetID": g["TargetID"], "Web_Class": web, "Web_Class_Code": web.astype(np.int8),
        "Dist_Filament": rng.exponential(np.array([12.0, 5.0, 1.2, 0.8])[web]),
        "Sigma_5": s5, "Sigma_10": s5 * 10 ** rng.normal(-0.1, 0.1, n),
        "Density_kNN3D": s5 / 10 * 10 ** rng.normal(0, 0.2, n), "Topology_flag": np.zeros(n, np.int32),
    }


def _embed(rng: np.random.Generator, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(g["Z"])
    out: dict[str, np.ndarray] = {"TargetID": g["TargetID"]}
    for name, dim in (("emb_astro", contract.EMB_ASTRO_DIM), ("emb_shen", contract.EMB_SHEN_DIM)):
        base = rng.standard_normal((6, dim)).astype(np.float32)  # one direction per population
        v = base[g["pop"]] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)
    return out


_LAYER_MAKERS: dict[str, Callable[[np.random.Generator, dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "lick": _lick, "ppxf": _ppxf, "bagpipes": _bagpipes, "topology": _topology, "embed": _embed,
}


def _to_table(cols: dict[str, np.ndarray]) -> pa.Table:
    arrays = {}
    for k, v in cols.items():
        if isinstance(v, pa.Array):
            arrays[k] = v
        elif v.dtype == object:
            arrays[k] = pa.array(v.tolist())
        else:
            arrays[k] = pa.array(v, from_pandas=True)  # NaN -> null (e.g. t_quench of star-forming galaxies)
    return pa.table(arrays)


def _write(ard_dir: Path, layer: str, order: int, pixel: int, cols: dict[str, np.ndarray], ra: np.ndarray, dec: np.ndarray) -> pa.Table:
    table = hats_writer.conform_table(_to_table(cols), layer, where=f"synth-catalog {layer} pixel {pixel}")
    table = hats_writer.with_positions(table, layer, ra, dec)
    hats_writer.write_partition(ard_dir, layer, order, pixel, table)
    return table


def synth_catalog(ard_dir: Path | str, options: SynthOptions, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Write a catalog-only ARD to ``ard_dir``; return rows per table.

    Partition by partition: memory is bounded by the largest partition, never
    by ``options.n``. ``progress(done, total)`` is called after each partition.
    """
    ard_dir = Path(ard_dir).resolve()
    if options.n < 1:
        raise ValueError(f"synth-catalog: --n must be >= 1, got {options.n}")
    unknown = set(options.layers) - set(_LAYER_MAKERS)
    if unknown:
        raise ValueError(f"synth-catalog: unknown layers {sorted(unknown)}; known: {', '.join(_LAYER_MAKERS)}")
    if paths.db_path(ard_dir).exists() or (paths.staging_dir(ard_dir)).exists():
        raise FileExistsError(f"synth-catalog: {ard_dir} already holds an ARD; choose an empty --out folder")
    rng = np.random.default_rng(options.seed)
    pixels = footprint_pixels(options.order)
    counts = rng.multinomial(options.n, np.full(len(pixels), 1 / len(pixels)))
    embed_pixels = set(rng.choice(pixels, size=int(round(options.embed_fraction * len(pixels))), replace=False).tolist())
    truth_dir = paths.artifact_dir(ard_dir, "synth")
    truth_dir.mkdir(parents=True, exist_ok=True)
    truth_writer = None
    first = _TARGET_ID0
    rows: dict[str, int] = {"core": 0}
    try:
        for i, (pixel, n) in enumerate(zip(pixels, counts)):
            if n == 0:
                continue
            prng = np.random.default_rng([options.seed, int(pixel)])
            g = simulate_partition(prng, options.order, int(pixel), int(n), first)
            first += int(n)
            written = {"core": _write(ard_dir, "core", options.order, int(pixel), _core(prng, g, options.order, int(pixel)), g["RA"], g["DEC"])}
            rows["core"] += int(n)
            for layer in options.layers:
                if layer == "embed" and int(pixel) not in embed_pixels:
                    continue
                written[layer] = _write(ard_dir, layer, options.order, int(pixel), _LAYER_MAKERS[layer](prng, g), g["RA"], g["DEC"])
                rows[layer] = rows.get(layer, 0) + int(n)
            if options.compact:  # the tables are in memory: no need to read them back as compact_partition would
                compaction.write(ard_dir, options.order, int(pixel), compaction.assemble(written))
                rows[compaction.WIDE] = rows.get(compaction.WIDE, 0) + int(n)
            truth = pa.table({"TargetID": g["TargetID"], "population": pa.array(np.array(POPULATIONS)[g["pop"]]),
                              "web_class": pa.array(np.array(contract.WEB_CLASSES)[g["web"]]), "age_dn4000": g["age_dn"]})
            if truth_writer is None:
                truth_writer = pq.ParquetWriter(truth_dir / "truth.parquet", truth.schema, compression="zstd")
            truth_writer.write_table(truth)
            if progress:
                progress(i + 1, len(pixels))
    finally:
        if truth_writer is not None:
            truth_writer.close()
    for layer in ("core", *options.layers, compaction.WIDE):
        if rows.get(layer):
            hats_writer.finalize_catalog(ard_dir, layer)
    opts = {"n": options.n, "order": options.order, "seed": options.seed, "embed_fraction": options.embed_fraction}
    from datetime import datetime, timezone

    prov = database.Provenance(source="ard synth-catalog (no spectra)", options=opts,
                               build_date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               extra={"synth_catalog": json.dumps(opts)})
    database.write_database(ard_dir, prov)
    return rows
