"""Write DESI-format healpix coadd, redrock and zpix-catalog files (astropy only).

The files follow the DESI data model (desidatamodel, ``DESI_SPECTRO_REDUX/
SPECPROD/healpix/SURVEY/PROGRAM/PIXGROUP/PIXNUM/``), so the same ingest code
reads the mock survey and real DESI DR1:

``coadd-<survey>-<program>-<hpx>.fits``
    PRIMARY (SPGRP='healpix', SPGRPVAL, SURVEY, PROGRAM, HPXPIXEL, HPXNSIDE,
    HPXNEST), FIBERMAP, EXP_FIBERMAP, then per arm X in B, R, Z:
    X_WAVELENGTH (nwave f8, BUNIT Angstrom), X_FLUX (nspec x nwave f4, 1e-17
    erg/s/cm2/A), X_IVAR (f4), X_MASK (uint32, stored as int32 with BZERO
    2**31 exactly as desispec writes it), X_RESOLUTION (nspec x 11 x nwave f4,
    diagonals with offsets ``ndiag//2 - arange(ndiag)``, scipy ``dia_matrix``
    convention), and SCORES last.
``redrock-<survey>-<program>-<hpx>.fits``
    PRIMARY, REDSHIFTS, FIBERMAP, EXP_FIBERMAP, TSNR2.
``zall-pix-<release>.fits``
    PRIMARY, ZCATALOG.

Every file is written to a temporary name and renamed, and carries
CHECKSUM/DATASUM cards whose comment is a fixed string (not the current
time), so identical inputs give identical bytes.

Folder layout (DR1-like, relative to a survey root ``DIR``)::

    DIR/healpix/<survey>/<program>/<hpx//100>/<hpx>/coadd-<survey>-<program>-<hpx>.fits
    DIR/healpix/<survey>/<program>/<hpx//100>/<hpx>/redrock-<survey>-<program>-<hpx>.fits
    DIR/zcatalog/zall-pix-<release>.fits
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ard_sql import paths

#: Comment written on CHECKSUM/DATASUM cards instead of the current time (reproducible bytes).
CHECKSUM_WHEN = "ard_sql mock (fixed for reproducibility)"
FLUX_UNIT = "10**-17 erg/(s cm2 Angstrom)"
IVAR_UNIT = "10**+34 (s2 cm4 Angstrom2) / erg2"
NDIAG = 11
ARM_NAMES = ("B", "R", "Z")
#: Wavelength ranges (Angstrom) of the SCORES columns, as desispec uses them.
_SCORE_RANGES = {"B": (4000.0, 5800.0), "R": (5800.0, 7600.0), "Z": (7600.0, 9800.0)}
_REDSHIFT_COLUMNS = ("TARGETID", "Z", "ZERR", "ZWARN", "SPECTYPE")


class DesiWriteError(ValueError):
    """Raised when the input to a DESI writer is malformed; the message names the file and the reason."""


# ---------------------------------------------------------------- paths
def healpix_group_dir(root: Path | str, survey: str, program: str, healpix: int) -> Path:
    """``root/healpix/<survey>/<program>/<hpx//100>/<hpx>``: the DR1 folder of one healpix group."""
    hpx = int(healpix)
    return Path(root) / "healpix" / survey / program / str(hpx // 100) / str(hpx)


def coadd_path(root: Path | str, survey: str, program: str, healpix: int) -> Path:
    """Path of the coadd file of one (survey, program, healpix)."""
    return healpix_group_dir(root, survey, program, healpix) / f"coadd-{survey}-{program}-{int(healpix)}.fits"


def redrock_path(root: Path | str, survey: str, program: str, healpix: int) -> Path:
    """Path of the redrock file of one (survey, program, healpix)."""
    return healpix_group_dir(root, survey, program, healpix) / f"redrock-{survey}-{program}-{int(healpix)}.fits"


def zcatalog_path(root: Path | str, release: str) -> Path:
    """Path of the zpix catalog ``root/zcatalog/zall-pix-<release>.fits``."""
    return Path(root) / "zcatalog" / f"zall-pix-{release}.fits"


# ---------------------------------------------------------------- helpers
def _table_hdu(table: Table, name: str) -> fits.BinTableHDU:
    """Binary-table HDU from an astropy Table, strings as fixed-width ASCII."""
    t = Table(table, copy=False)
    hdu = fits.BinTableHDU(t, name=name)
    hdu.header["EXTNAME"] = name
    return hdu


def _write_atomic(hdus: list[fits.PrimaryHDU | fits.ImageHDU | fits.BinTableHDU], path: Path) -> Path:
    """Write an HDU list to ``path`` via a temporary sibling and ``os.replace`` (never a half file)."""
    path = Path(path)
    for hdu in hdus:
        hdu.add_checksum(when=CHECKSUM_WHEN)
    with paths.atomic_path(path) as tmp:
        # checksum=False: the cards were added above with a fixed comment.
        fits.HDUList(hdus).writeto(tmp, overwrite=True, checksum=False, output_verify="exception")
    return path


def _primary(header: Mapping[str, Any] | None) -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU()
    for key, value in (header or {}).items():
        hdu.header[key.upper()] = value
    return hdu


def _require(table: Table, columns: tuple[str, ...], what: str, path: Path) -> None:
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise DesiWriteError(f"{path}: {what} lacks required column(s) {', '.join(missing)}")


def _default_exp_fibermap(fibermap: Table) -> Table:
    """One exposure row per target, with the EXP_FIBERMAP columns the data model lists."""
    n = len(fibermap)
    out = Table()
    out["TARGETID"] = np.asarray(fibermap["TARGETID"], dtype=np.int64)
    out["NIGHT"] = np.full(n, 20210515, dtype=np.int32)
    out["EXPID"] = np.full(n, 90000, dtype=np.int32)
    out["TILEID"] = np.full(n, 1000, dtype=np.int32)
    out["EXPTIME"] = (
        np.asarray(fibermap["COADD_EXPTIME"], dtype=np.float64) if "COADD_EXPTIME" in fibermap.colnames else np.full(n, 1000.0)
    )
    out["FIBER"] = (np.arange(n) % 5000).astype(np.int32)
    out["FIBERSTATUS"] = np.zeros(n, dtype=np.int32)
    return out


def _scores(targetid: np.ndarray, arms: Mapping[str, Mapping[str, np.ndarray]]) -> Table:
    """SCORES table: integrated/median flux and median S/N per sqrt(Angstrom) per arm, as desispec defines them."""
    out = Table()
    out["TARGETID"] = np.asarray(targetid, dtype=np.int64)
    for arm in ARM_NAMES:
        if arm not in arms:
            continue
        wave = np.asarray(arms[arm]["wave"], dtype=np.float64)
        flux = np.asarray(arms[arm]["flux"], dtype=np.float64)
        ivar = np.asarray(arms[arm]["ivar"], dtype=np.float64)
        lo, hi = _SCORE_RANGES[arm]
        sel = (wave >= lo) & (wave < hi)
        dw = np.gradient(wave)[sel]
        f, iv = flux[:, sel], ivar[:, sel]
        out[f"INTEG_COADD_FLUX_{arm}"] = (f * dw).sum(axis=1).astype(np.float32)
        out[f"MEDIAN_COADD_FLUX_{arm}"] = np.median(f, axis=1).astype(np.float32)
        out[f"MEDIAN_COADD_SNR_{arm}"] = np.median(f * np.sqrt(iv / dw), axis=1).astype(np.float32)
    return out


def _check_arm(path: Path, arm: str, data: Mapping[str, np.ndarray], nspec: int, resolution: bool = True) -> None:
    for key in ("wave", "flux", "ivar", "mask") + (("resolution",) if resolution else ()):
        if key not in data:
            raise DesiWriteError(f"{path}: arm {arm} lacks {key!r}")
    nwave = np.shape(data["wave"])[0]
    for key in ("flux", "ivar", "mask"):
        if np.shape(data[key]) != (nspec, nwave):
            raise DesiWriteError(f"{path}: arm {arm} {key} has shape {np.shape(data[key])}, expected {(nspec, nwave)}")
    rshape = np.shape(data["resolution"]) if resolution else (nspec, NDIAG, nwave)
    if len(rshape) != 3 or rshape[0] != nspec or rshape[2] != nwave:
        raise DesiWriteError(f"{path}: arm {arm} resolution has shape {rshape}, expected ({nspec}, ndiag, {nwave})")
    if not np.all(np.isfinite(data["flux"])) or not np.all(np.isfinite(data["ivar"])):
        raise DesiWriteError(f"{path}: arm {arm} flux or ivar has non-finite values")
    if np.any(np.asarray(data["ivar"]) < 0):
        raise DesiWriteError(f"{path}: arm {arm} ivar has negative values")


# ---------------------------------------------------------------- writers
def write_coadd(
    path: Path | str,
    fibermap: Table,
    arms: Mapping[str, Mapping[str, np.ndarray]],
    header: Mapping[str, Any] | None = None,
    exp_fibermap: Table | None = None,
    scores: Table | None = None,
    resolution: bool = True,
) -> Path:
    """Write a DESI healpix coadd file.

    Args:
        path: output file (``coadd_path(...)`` gives the DR1 name); parents are created.
        fibermap: one row per spectrum; needs TARGETID, TARGET_RA, TARGET_DEC; every other
            column (FLUX_G ..., DESI_TARGET, OBJTYPE, PHOTSYS, ...) is written as given.
        arms: ``{"B": dict(wave=(nwave,), flux=(nspec, nwave), ivar=..., mask=...,
            resolution=(nspec, ndiag, nwave)), "R": ..., "Z": ...}``; flux in 1e-17 erg/s/cm2/A.
        header: PRIMARY header cards, e.g. ``SPGRP='healpix', SPGRPVAL=hpx, SURVEY, PROGRAM,
            HPXPIXEL, HPXNSIDE, HPXNEST``.
        exp_fibermap: per-exposure table; default one row per target with NIGHT/EXPID/TILEID/EXPTIME.
        scores: SCORES table; default computed from the arms as desispec does.
        resolution: write the X_RESOLUTION HDUs (False: omit them and the ``resolution`` arrays are not needed).

    Returns:
        The path written. Raises ``DesiWriteError`` naming the file and the problem on bad input.
    """
    path = Path(path)
    _require(fibermap, ("TARGETID", "TARGET_RA", "TARGET_DEC"), "FIBERMAP", path)
    if not arms:
        raise DesiWriteError(f"{path}: no arms given")
    unknown = set(arms) - set(ARM_NAMES)
    if unknown:
        raise DesiWriteError(f"{path}: unknown arm(s) {sorted(unknown)}; expected B, R, Z")
    nspec = len(fibermap)
    for arm, data in arms.items():
        _check_arm(path, arm, data, nspec, resolution)
    hdus: list[Any] = [_primary(header), _table_hdu(fibermap, "FIBERMAP")]
    hdus.append(_table_hdu(exp_fibermap if exp_fibermap is not None else _default_exp_fibermap(fibermap), "EXP_FIBERMAP"))
    for arm in ARM_NAMES:
        if arm not in arms:
            continue
        data = arms[arm]
        hdus.append(fits.ImageHDU(np.asarray(data["wave"], dtype=np.float64), name=f"{arm}_WAVELENGTH"))
        hdus[-1].header["BUNIT"] = "Angstrom"
        hdus.append(fits.ImageHDU(np.asarray(data["flux"], dtype=np.float32), name=f"{arm}_FLUX"))
        hdus[-1].header["BUNIT"] = FLUX_UNIT
        hdus.append(fits.ImageHDU(np.asarray(data["ivar"], dtype=np.float32), name=f"{arm}_IVAR"))
        hdus[-1].header["BUNIT"] = IVAR_UNIT
        # uint32 is stored as int32 + BZERO=2**31, as in desispec's files.
        hdus.append(fits.ImageHDU(np.asarray(data["mask"], dtype=np.uint32), name=f"{arm}_MASK", uint=True))
        if resolution:
            hdus.append(fits.ImageHDU(np.asarray(data["resolution"], dtype=np.float32), name=f"{arm}_RESOLUTION"))
    hdus.append(_table_hdu(scores if scores is not None else _scores(fibermap["TARGETID"], arms), "SCORES"))
    return _write_atomic(hdus, path)


def write_redrock(
    path: Path | str,
    redshifts: Table,
    fibermap: Table,
    tsnr2: Table,
    exp_fibermap: Table | None = None,
    header: Mapping[str, Any] | None = None,
) -> Path:
    """Write a DESI redrock file: PRIMARY, REDSHIFTS, FIBERMAP, EXP_FIBERMAP, TSNR2.

    Args:
        path: output file (``redrock_path(...)``).
        redshifts: TARGETID, Z, ZERR, ZWARN, SPECTYPE required; CHI2, COEFF (n x 10), FITMETHOD,
            NPIXELS, SUBTYPE, NCOEFF, DELTACHI2 written as given.
        fibermap: the coadd's FIBERMAP (same row order as ``redshifts``).
        tsnr2: TARGETID, TSNR2_BGS, TSNR2_LRG, TSNR2_ELG, TSNR2_QSO, TSNR2_LYA (per-arm columns optional).
        exp_fibermap: as in ``write_coadd``.
        header: PRIMARY cards (e.g. RRVER, TEMNAM00 ...).
    """
    path = Path(path)
    _require(redshifts, _REDSHIFT_COLUMNS, "REDSHIFTS", path)
    _require(fibermap, ("TARGETID", "TARGET_RA", "TARGET_DEC"), "FIBERMAP", path)
    _require(tsnr2, ("TARGETID",), "TSNR2", path)
    for name, t in (("FIBERMAP", fibermap), ("TSNR2", tsnr2)):
        if len(t) != len(redshifts) or not np.array_equal(np.asarray(t["TARGETID"]), np.asarray(redshifts["TARGETID"])):
            raise DesiWriteError(f"{path}: {name} TARGETIDs do not match REDSHIFTS row for row")
    hdus: list[Any] = [
        _primary(header),
        _table_hdu(redshifts, "REDSHIFTS"),
        _table_hdu(fibermap, "FIBERMAP"),
        _table_hdu(exp_fibermap if exp_fibermap is not None else _default_exp_fibermap(fibermap), "EXP_FIBERMAP"),
        _table_hdu(tsnr2, "TSNR2"),
    ]
    return _write_atomic(hdus, path)


def write_zcatalog(path: Path | str, table: Table, header: Mapping[str, Any] | None = None) -> Path:
    """Write a zpix-like catalog (HDU ZCATALOG).

    ``table`` needs TARGETID, SURVEY, PROGRAM, HEALPIX, Z, ZWARN, ZCAT_PRIMARY (bool) and
    ZCAT_NSPEC; any other column (SPECTYPE, ZERR, TARGET_RA, ...) is written as given.
    """
    path = Path(path)
    _require(table, ("TARGETID", "SURVEY", "PROGRAM", "HEALPIX", "Z", "ZWARN", "ZCAT_PRIMARY", "ZCAT_NSPEC"), "ZCATALOG", path)
    return _write_atomic([_primary(header), _table_hdu(table, "ZCATALOG")], path)
