"""Shared fixtures: tiny DESI-format files (astropy, DESI data model) and tiny ARDs.

``write_pair(root, ...)`` writes one healpix coadd + redrock pair in the DR1
layout with full control over what goes in (bad values included), so the
ingest's checks can be exercised; ``survey_dir`` is a small healthy survey
and ``core_ard`` an ARD with the core table ingested from it (other engineers'
tests may use it to run a layer on real files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import healpy as hp
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from ard_sql import grid

NDIAG = 11
ARM_SIGMA_PIX = {"B": 1.0, "R": 1.2, "Z": 1.4}


def arm_wave(arm: str) -> np.ndarray:
    """Wavelengths of one DESI arm (on the brz grid)."""
    return grid.arm_wavelength(arm)


def resolution_data(arm: str, nspec: int) -> np.ndarray:
    """Gaussian resolution data (nspec, 11, nwave), offsets ndiag//2 - arange(ndiag)."""
    offsets = NDIAG // 2 - np.arange(NDIAG)
    kern = np.exp(-0.5 * (offsets / ARM_SIGMA_PIX[arm]) ** 2)
    kern /= kern.sum()
    nwave = len(arm_wave(arm))
    return np.broadcast_to(kern[None, :, None], (nspec, NDIAG, nwave)).astype(np.float32).copy()


@dataclass
class PairSpec:
    """What to write in one coadd/redrock pair (arrays of length n)."""

    targetid: np.ndarray
    z: np.ndarray | None = None
    zwarn: np.ndarray | None = None
    tsnr2_lrg: np.ndarray | None = None
    desi_target: np.ndarray | None = None
    flux_level: np.ndarray | None = None
    """Per-target flat flux level (1e-17 erg/s/cm2/A)."""
    ivar_level: float = 4.0
    arm_flux: dict[str, np.ndarray] = field(default_factory=dict)
    """Override: per-arm (n, nwave) flux."""
    arm_ivar: dict[str, np.ndarray] = field(default_factory=dict)
    arm_mask: dict[str, np.ndarray] = field(default_factory=dict)
    drop_hdus: tuple[str, ...] = ()
    fibermap_extra_rows: int = 0
    redrock_targetid: np.ndarray | None = None


def pixel_positions(hpx: int, targetid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions well inside the nside-64 NESTED pixel ``hpx``, one per target and the same in every file
    (a target observed in two programs sits at one place on the sky)."""
    ra0, dec0 = hp.pix2ang(64, hpx, nest=True, lonlat=True)
    offset = np.array([np.random.default_rng(int(t) % 2**32).uniform(-0.05, 0.05, 2) for t in targetid]).reshape(-1, 2)
    return ra0 + offset[:, 0], dec0 + offset[:, 1]


def write_pair(root: Path, survey: str, program: str, hpx: int, spec: PairSpec, seed: int = 0) -> tuple[Path, Path]:
    """Write coadd-<survey>-<program>-<hpx>.fits and redrock-... in the DR1 layout; return both paths."""
    rng = np.random.default_rng(seed)
    tid = np.asarray(spec.targetid, dtype=np.int64)
    n = len(tid)
    folder = Path(root) / "healpix" / survey / program / str(hpx // 100) / str(hpx)
    folder.mkdir(parents=True, exist_ok=True)
    ra, dec = pixel_positions(hpx, tid)
    prefix = {"sv1": "SV1_", "sv3": "SV3_"}.get(survey, "")
    fm = Table()
    fm["TARGETID"] = tid
    fm["TARGET_RA"] = ra
    fm["TARGET_DEC"] = dec
    fm["COADD_FIBERSTATUS"] = np.zeros(n, np.int32)
    for b in ("G", "R", "Z", "W1", "W2"):
        fm[f"FLUX_{b}"] = np.full(n, 10.0, np.float32)
        fm[f"FLUX_IVAR_{b}"] = np.full(n, 100.0, np.float32)
    fm["EBV"] = np.full(n, 0.02, np.float32)
    fm[f"{prefix}DESI_TARGET"] = np.asarray(spec.desi_target if spec.desi_target is not None else np.ones(n), np.int64)
    fm[f"{prefix}BGS_TARGET"] = np.zeros(n, np.int64)
    fm[f"{prefix}MWS_TARGET"] = np.zeros(n, np.int64)
    fm[f"{prefix}SCND_TARGET"] = np.zeros(n, np.int64)
    fm["OBJTYPE"] = np.array(["TGT"] * n)
    if spec.fibermap_extra_rows:
        extra = fm[:spec.fibermap_extra_rows].copy()
        extra["TARGETID"] = tid[: spec.fibermap_extra_rows] + 10**9
        from astropy.table import vstack
        fm = vstack([fm, extra])
    hdr = fits.Header({"SPGRP": "healpix", "SPGRPVAL": hpx, "SURVEY": survey, "PROGRAM": program,
                       "HPXPIXEL": hpx, "HPXNSIDE": 64, "HPXNEST": True})
    hdus: list[Any] = [fits.PrimaryHDU(header=hdr), fits.BinTableHDU(fm, name="FIBERMAP")]
    level = np.asarray(spec.flux_level if spec.flux_level is not None else np.full(n, 2.0), np.float32)
    for arm in ("B", "R", "Z"):
        wave = arm_wave(arm)
        flux = spec.arm_flux.get(arm)
        if flux is None:
            flux = (level[:, None] + rng.normal(0, 0.5, (n, len(wave)))).astype(np.float32)
        ivar = spec.arm_ivar.get(arm, np.full((n, len(wave)), spec.ivar_level, np.float32))
        mask = spec.arm_mask.get(arm, np.zeros((n, len(wave)), np.uint32))
        for name, data in (("WAVELENGTH", wave), ("FLUX", flux), ("IVAR", ivar), ("MASK", mask), ("RESOLUTION", resolution_data(arm, n))):
            if f"{arm}_{name}" in spec.drop_hdus:
                continue
            if name == "MASK":
                hdus.append(fits.ImageHDU(np.asarray(data, np.uint32), name=f"{arm}_{name}", uint=True))
            else:
                hdus.append(fits.ImageHDU(np.asarray(data, np.float64 if name == "WAVELENGTH" else np.float32), name=f"{arm}_{name}"))
    sc = Table({"TARGETID": np.asarray(fm["TARGETID"])})
    hdus.append(fits.BinTableHDU(sc, name="SCORES"))
    hdus = [h for h in hdus if h.name not in spec.drop_hdus]
    coadd = folder / f"coadd-{survey}-{program}-{hpx}.fits"
    fits.HDUList(hdus).writeto(coadd, overwrite=True)

    rtid = np.asarray(spec.redrock_targetid if spec.redrock_targetid is not None else tid, np.int64)
    m = len(rtid)
    zt = Table()
    zt["TARGETID"] = rtid
    zt["Z"] = np.asarray(spec.z if spec.z is not None else np.linspace(0.1, 0.5, m), np.float64)[:m]
    zt["ZERR"] = np.full(m, 1e-4)
    zt["ZWARN"] = np.asarray(spec.zwarn if spec.zwarn is not None else np.zeros(m), np.int64)[:m]
    zt["CHI2"] = np.full(m, 8000.0)
    zt["DELTACHI2"] = np.full(m, 100.0)
    zt["SPECTYPE"] = np.array(["GALAXY"] * m)
    zt["SUBTYPE"] = np.array([""] * m)
    ts = Table()
    ts["TARGETID"] = rtid
    for t in ("BGS", "LRG", "ELG", "QSO", "LYA"):
        ts[f"TSNR2_{t}"] = np.full(m, 50.0, np.float32)
    if spec.tsnr2_lrg is not None:
        ts["TSNR2_LRG"] = np.asarray(spec.tsnr2_lrg, np.float32)[:m]
    rr_hdus = [fits.PrimaryHDU(), fits.BinTableHDU(zt, name="REDSHIFTS"), fits.BinTableHDU(fm[:0], name="FIBERMAP"),
               fits.BinTableHDU(ts, name="TSNR2")]
    rr_hdus = [h for h in rr_hdus if h.name not in spec.drop_hdus]
    redrock = folder / f"redrock-{survey}-{program}-{hpx}.fits"
    fits.HDUList(rr_hdus).writeto(redrock, overwrite=True)
    return coadd, redrock


#: nside-64 NESTED pixels used by the small survey: two far apart (different partitions at order >= 0)
#: and two neighbours sharing an order-5 parent.
SURVEY_PIXELS = (100, 101, 20000, 40000)


def write_small_survey(root: Path, n_per_pixel: int = 6) -> dict[str, Any]:
    """A healthy 4-pixel survey plus one target observed in two programs; returns the truth."""
    truth: dict[str, Any] = {"targets": {}}
    tid0 = 39627640566170000
    for i, hpx in enumerate(SURVEY_PIXELS):
        tid = tid0 + 100 * i + np.arange(n_per_pixel)
        level = 1.0 + np.arange(n_per_pixel, dtype=np.float32) + i
        write_pair(root, "main", "dark", hpx, PairSpec(tid, flux_level=level, desi_target=np.full(n_per_pixel, 1)), seed=i)
        for t, lv in zip(tid, level):
            truth["targets"][int(t)] = {"pixel": hpx, "level": float(lv)}
    # The first target of pixel 100 again, in the bright program, with a better TSNR2_LRG but ZWARN != 0:
    # desispec's rule keeps the dark spectrum (ZWARN == 0 first).
    dup = tid0
    write_pair(root, "main", "bright", 100, PairSpec(np.array([dup]), zwarn=np.array([4]), tsnr2_lrg=np.array([500.0]),
                                                      flux_level=np.array([50.0], np.float32)), seed=9)
    truth["duplicate"] = dup
    return truth


@pytest.fixture
def survey_dir(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A small healthy DESI-format survey folder and its truth."""
    root = tmp_path / "survey"
    return root, write_small_survey(root)


@pytest.fixture
def core_ard(tmp_path: Path, survey_dir: tuple[Path, dict[str, Any]]) -> Path:
    """An ARD folder with the core table ingested (single process, no layers)."""
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    root, _ = survey_dir
    out = tmp_path / "ard"
    report = build(BuildOptions(source=str(root), out=str(out), layers=[], scheduler="sync", progress=False))
    assert not report.errors, report.errors
    return out
