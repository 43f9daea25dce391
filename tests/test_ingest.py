"""Ingest (issue 2): arm combination, deduplication, every bad input, re-runs.

Every test writes its own tiny DESI-format files (``conftest.write_pair``)
and builds the core only (``layers=[]``, ``scheduler='sync'``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

import ard_sql
from ard_sql import grid, paths
from ard_sql.build import hats_writer
from ard_sql.build.ingest import combine
from ard_sql.build.options import BuildOptions
from ard_sql.build.orchestrator import build
from ard_sql.build.report import BadInput
from ard_sql.spectra_store import read_partition

from conftest import PairSpec, arm_wave, write_pair, write_small_survey

TID0 = 39627640566170000
# A pixel far from the small survey's (own partition at every order): bad inputs go there.
BAD_PIXEL = 30000


def run_build(source: Path, out: Path, **kw):
    return build(BuildOptions(source=str(source), out=str(out), layers=[], scheduler="sync", progress=False, **kw))


def core_rows(ard: Path, columns: str = "*", where: str = "true") -> list[dict]:
    with ard_sql.open(ard) as db:
        rel = db.sql(f"SELECT {columns} FROM core WHERE {where} ORDER BY TargetID")
        names = rel.columns
        return [dict(zip(names, r)) for r in rel.fetchall()]


def stored_spectrum(ard: Path, tid: int) -> dict:
    return stored_spectra(ard, [tid])[tid]


def stored_spectra(ard: Path, tids) -> dict[int, dict | None]:
    """spectrum(t) of several targets, through one connection."""
    tids = [int(t) for t in tids]
    with ard_sql.open(ard) as db:
        rows = db.sql("SELECT t, spectrum(t) FROM (SELECT unnest(?::BIGINT[]) AS t)", params=[tids]).fetchall()
    return {int(t): s for t, s in rows}


def overlap(a: str, b: str) -> tuple[slice, slice, slice]:
    """(brz slice, index in arm a, index in arm b) of the overlap of two arms."""
    sa, sb = grid.arm_slice(a), grid.arm_slice(b)
    lo, hi = max(sa.start, sb.start), min(sa.stop, sb.stop)
    return slice(lo, hi), slice(lo - sa.start, hi - sa.start), slice(lo - sb.start, hi - sb.start)


# ------------------------------------------------------------------ arm combination
def _flat_arms(n: int, levels: dict[str, float], ivars: dict[str, float]) -> dict:
    out = {}
    for arm in ("B", "R", "Z"):
        nw = len(arm_wave(arm))
        out[arm] = (grid.arm_slice(arm), np.full((n, nw), levels[arm], np.float32),
                    np.full((n, nw), ivars[arm], np.float32), np.zeros((n, nw), np.uint32))
    return out


def test_combine_inverse_variance_weighting_in_both_overlaps():
    arms = _flat_arms(2, {"B": 1.0, "R": 4.0, "Z": 10.0}, {"B": 1.0, "R": 3.0, "Z": 0.5})
    comb = combine.combine_arms(arms, 2)
    br, _, _ = overlap("B", "R")
    rz, _, _ = overlap("R", "Z")
    assert br.stop - br.start == 51 and rz.stop - rz.start == 126  # 5760-5800 and 7520-7620 A
    np.testing.assert_allclose(comb.flux[:, br], (1 * 1 + 4 * 3) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(comb.ivar[:, br], 4.0, rtol=1e-6)
    np.testing.assert_allclose(comb.flux[:, rz], (4 * 3 + 10 * 0.5) / 3.5, rtol=1e-6)
    np.testing.assert_allclose(comb.ivar[:, rz], 3.5, rtol=1e-6)
    # Outside the overlaps: the arm's own values.
    assert np.all(comb.flux[:, : br.start] == 1.0) and np.all(comb.ivar[:, : br.start] == 1.0)
    assert np.all(comb.flux[:, br.stop: rz.start] == 4.0)
    assert np.all(comb.flux[:, rz.stop:] == 10.0) and np.all(comb.ivar[:, rz.stop:] == 0.5)
    assert np.all(comb.mask == 0)
    np.testing.assert_allclose(comb.snr_arm["R"], 4.0 * np.sqrt(3.0), rtol=1e-6)


def test_combine_respects_masks_and_repairs_bad_values():
    arms = _flat_arms(1, {"B": 1.0, "R": 4.0, "Z": 10.0}, {"B": 1.0, "R": 3.0, "Z": 0.5})
    br, ib, ir = overlap("B", "R")
    bmask, rmask = arms["B"][3], arms["R"][3]
    bmask[0, ib.start: ib.start + 10] = 1          # B bad, R good: R only
    rmask[0, ir.start + 20: ir.start + 30] = 2     # R bad, B good: B only
    bmask[0, ib.start + 40: ib.start + 45] = 4     # both bad: no data
    rmask[0, ir.start + 40: ir.start + 45] = 8
    bflux, bivar = arms["B"][1], arms["B"][2]
    bflux[0, 100] = np.nan                          # NaN flux outside the overlap
    bivar[0, 200] = -1.0                            # negative ivar
    bmask[0, 300] = 16                              # a masked pixel in one arm only
    comb = combine.combine_arms(arms, 1)
    s = br.start
    np.testing.assert_allclose(comb.flux[0, s: s + 10], 4.0)
    np.testing.assert_allclose(comb.ivar[0, s: s + 10], 3.0)
    assert np.all(comb.mask[0, s: s + 10] == 0)
    np.testing.assert_allclose(comb.flux[0, s + 20: s + 30], 1.0)
    np.testing.assert_allclose(comb.ivar[0, s + 20: s + 30], 1.0)
    assert np.all(comb.ivar[0, s + 40: s + 45] == 0)
    assert np.all(comb.mask[0, s + 40: s + 45] != 0)
    for px in (100, 200):
        assert comb.ivar[0, px] == 0 and comb.mask[0, px] & combine.BADVALUE and np.isfinite(comb.flux[0, px])
    assert comb.ivar[0, 300] == 0 and comb.mask[0, 300] == 16
    assert comb.n_repaired[0] == 2
    assert np.all(np.isfinite(comb.flux))


def test_median_snr_uses_only_good_pixels():
    flux = np.array([[1.0, 2.0, 3.0, 100.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    ivar = np.array([[4.0, 4.0, 4.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], np.uint32)
    snr = combine.median_snr(flux, ivar, mask)
    assert snr[0] == pytest.approx(4.0)  # median of 2, 4, 6 (100 masked, 5 has ivar 0)
    assert np.isnan(snr[1])


def test_arm_combination_end_to_end(tmp_path):
    """Arms with known flux/ivar/mask -> the stored spectrum and SNR_Median of the core table."""
    n = 3
    tid = TID0 + np.arange(n)
    levels = {"B": 1.0, "R": 4.0, "Z": 10.0}
    ivars = {"B": 1.0, "R": 3.0, "Z": 0.5}
    arm_flux, arm_ivar, arm_mask = {}, {}, {}
    for arm in ("B", "R", "Z"):
        nw = len(arm_wave(arm))
        arm_flux[arm] = np.full((n, nw), levels[arm], np.float32) * (1 + np.arange(n))[:, None]
        arm_ivar[arm] = np.full((n, nw), ivars[arm], np.float32)
        arm_mask[arm] = np.zeros((n, nw), np.uint32)
    br, ib, ir = overlap("B", "R")
    arm_mask["B"][1, ib.start: ib.start + 10] = 1  # target 1: B masked in part of the b/r overlap
    arm_mask["R"][1, 0:500] |= 2                   # ... and 500 R pixels masked (first 51 in the overlap)
    write_pair(tmp_path / "src", "main", "dark", 100,
               PairSpec(tid, arm_flux=arm_flux, arm_ivar=arm_ivar, arm_mask=arm_mask))
    out = tmp_path / "ard"
    report = run_build(tmp_path / "src", out)
    assert not report.errors, report.errors
    rows = {r["TargetID"]: r for r in core_rows(out)}
    assert sorted(rows) == list(tid)
    rz, _, _ = overlap("R", "Z")
    spectra = stored_spectra(out, tid)
    for i, t in enumerate(tid):
        s = spectra[int(t)]
        flux, ivar, mask = (np.asarray(s[k]) for k in ("flux", "ivar", "mask"))
        k = 1 + i
        assert len(flux) == grid.NPIX
        np.testing.assert_allclose(np.asarray(s["wavelength"]), grid.brz_wavelength(), atol=1e-3)
        np.testing.assert_allclose(flux[rz], k * (4 * 3 + 10 * 0.5) / 3.5, rtol=1e-5)
        np.testing.assert_allclose(ivar[rz], 3.5, rtol=1e-6)
        good = (mask == 0) & (ivar > 0)
        expected_snr = np.median(flux[good] * np.sqrt(ivar[good]))
        assert rows[t]["SNR_Median"] == pytest.approx(expected_snr, rel=1e-5)
        assert rows[t]["SNR_B"] == pytest.approx(k * 1.0, rel=1e-5)
        assert rows[t]["SNR_Z"] == pytest.approx(k * 10 * np.sqrt(0.5), rel=1e-5)
    # Target 0: plain weighting in the b/r overlap.
    s0 = spectra[int(tid[0])]
    np.testing.assert_allclose(np.asarray(s0["flux"])[br], (1 + 12) / 4.0, rtol=1e-5)
    # Target 1: B masked and R masked over the b/r overlap -> no data there; R masked beyond -> ivar 0.
    s1 = spectra[int(tid[1])]
    f1, v1, m1 = (np.asarray(s1[k]) for k in ("flux", "ivar", "mask"))
    assert np.all(v1[br.start: br.start + 10] == 0) and np.all(m1[br.start: br.start + 10] != 0)
    np.testing.assert_allclose(f1[br.start + 10: br.stop], 2 * 1.0, rtol=1e-5)  # B only (R masked)
    np.testing.assert_allclose(v1[br.start + 10: br.stop], 1.0)
    rs = grid.arm_slice("R").start
    assert np.all(v1[br.stop: rs + 500] == 0)  # R alone and masked
    np.testing.assert_allclose(v1[rs + 500: rz.start], 3.0)
    # SNR_R of target 1 is over its unmasked R pixels only (all at 2*4*sqrt(3)).
    assert rows[int(tid[1])]["SNR_R"] == pytest.approx(2 * 4 * np.sqrt(3.0), rel=1e-5)


# ------------------------------------------------------------------ core table content
def test_core_columns_from_the_files(core_ard, survey_dir):
    _, truth = survey_dir
    rows = core_rows(core_ard)
    assert len(rows) == len(truth["targets"])
    for r in rows:
        t = truth["targets"][r["TargetID"]]
        assert r["HEALPIX"] == t["pixel"]
        assert r["TARGET_CLASS"] == "LRG"  # DESI_TARGET bit 0
        assert r["SURVEY"] == "main" and r["SPECTYPE"] == "GALAXY"
        assert r["FLUX_G"] == pytest.approx(10.0) and r["EBV"] == pytest.approx(0.02)
        assert r["TSNR2_ELG"] == pytest.approx(50.0)
        assert r["SPEC_FILE"].startswith("spectra/Norder=")
        # A flat spectrum at level L with ivar 4 (noise sigma 0.5): S/N ~ 2L.
        assert r["SNR_Median"] == pytest.approx(2 * t["level"], rel=0.05)
        assert r["SOURCE_FILE"].startswith("healpix/main/")


def test_older_files_without_optional_columns_give_nulls(tmp_path):
    src = tmp_path / "src"
    write_pair(src, "main", "dark", 100, PairSpec(TID0 + np.arange(3), drop_hdus=("TSNR2", "B_RESOLUTION")))
    coadd = src / "healpix/main/dark/1/100/coadd-main-dark-100.fits"
    with fits.open(coadd) as h:  # remove FIBERMAP's EBV and FLUX_W2 (older files lack some columns)
        fm = Table(h["FIBERMAP"].data)
        fm.remove_columns(["EBV", "FLUX_W2"])
        hdus = [x.copy() for x in h]
    hdus[1] = fits.BinTableHDU(fm, name="FIBERMAP")
    fits.HDUList(hdus).writeto(coadd, overwrite=True)
    report = run_build(src, tmp_path / "ard")
    assert not report.errors, report.errors
    rows = core_rows(tmp_path / "ard")
    assert len(rows) == 3
    assert all(r["TSNR2_LRG"] is None and r["EBV"] is None and r["FLUX_W2"] is None for r in rows)
    assert all(r["FLUX_G"] == pytest.approx(10.0) and r["Z"] is not None for r in rows)


def test_flat_folder_with_tile_coadds(tmp_path):
    """Tile-based coadds (coadd-<petal>-<tile>-thru<night>.fits) in a flat folder, matched by name."""
    tmp = tmp_path / "tmp"
    c, r = write_pair(tmp, "main", "dark", 100, PairSpec(TID0 + np.arange(4)))
    c2, r2 = write_pair(tmp, "main", "bright", 20000, PairSpec(TID0 + 10 + np.arange(3)))
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(c, flat / "coadd-0-1000-thru20210515.fits")
    shutil.copy(r, flat / "redrock-0-1000-thru20210515.fits")
    shutil.copy(c2, flat / "coadd-3-1001-thru20210516.fits")
    shutil.copy(r2, flat / "redrock-3-1001-thru20210516.fits")
    report = run_build(flat, tmp_path / "ard")
    assert not report.errors, report.errors
    rows = core_rows(tmp_path / "ard")
    assert len(rows) == 7
    assert {r["PROGRAM"] for r in rows} == {"dark", "bright"}


def test_a_target_on_two_tiles_is_a_normal_repeat(tmp_path):
    """Tile coadds repeat a target observed on several tiles (same survey and program): one row with N_SPECTRA 2,
    no error, and the next build still updates the partition."""
    tmp = tmp_path / "tmp"
    c, r = write_pair(tmp, "main", "dark", 100, PairSpec(TID0 + np.arange(4)))
    flat = tmp_path / "flat"
    flat.mkdir()
    for tile, night in ((1000, 20210515), (1001, 20210601)):
        shutil.copy(c, flat / f"coadd-0-{tile}-thru{night}.fits")
        shutil.copy(r, flat / f"redrock-0-{tile}-thru{night}.fits")
    report = run_build(flat, tmp_path / "ard")
    assert not report.errors, [str(p) for p in report.problems]
    rows = core_rows(tmp_path / "ard", "TargetID, N_SPECTRA")
    assert [r["N_SPECTRA"] for r in rows] == [2] * 4


# ------------------------------------------------------------------ deduplication
def test_duplicate_target_gives_one_row_with_n_spectra(core_ard, survey_dir):
    _, truth = survey_dir
    dup = truth["duplicate"]
    rows = core_rows(core_ard)
    assert sum(r["TargetID"] == dup for r in rows) == 1
    row = next(r for r in rows if r["TargetID"] == dup)
    assert row["N_SPECTRA"] == 2
    assert all(r["N_SPECTRA"] == 1 for r in rows if r["TargetID"] != dup)
    # ZWARN == 0 beats a larger TSNR2_LRG with ZWARN != 0: the dark spectrum (level 1) is primary.
    assert row["PROGRAM"] == "dark" and row["ZWARN"] == 0
    flux = np.asarray(stored_spectrum(core_ard, dup)["flux"])
    assert abs(np.median(flux) - truth["targets"][dup]["level"]) < 0.2


def test_dedup_rule_larger_tsnr2_lrg_wins_when_both_zwarn_zero(tmp_path):
    src = tmp_path / "src"
    tid = np.array([TID0, TID0 + 1])
    write_pair(src, "main", "dark", 100, PairSpec(tid, tsnr2_lrg=np.array([10.0, 900.0]), flux_level=np.array([1.0, 1.0])), seed=1)
    write_pair(src, "main", "bright", 100, PairSpec(tid, tsnr2_lrg=np.array([20.0, 30.0]), flux_level=np.array([7.0, 7.0])), seed=2)
    write_pair(src, "sv3", "dark", 100, PairSpec(tid[:1], tsnr2_lrg=np.array([5000.0]), zwarn=np.array([4]),
                                                 flux_level=np.array([20.0])), seed=3)
    report = run_build(src, tmp_path / "ard")
    assert not report.errors, report.errors
    rows = {r["TargetID"]: r for r in core_rows(tmp_path / "ard")}
    assert len(rows) == 2
    assert rows[TID0]["N_SPECTRA"] == 3 and rows[TID0 + 1]["N_SPECTRA"] == 2
    assert (rows[TID0]["SURVEY"], rows[TID0]["PROGRAM"]) == ("main", "bright")  # 20 > 10; sv3 has ZWARN != 0
    assert rows[TID0]["TSNR2_LRG"] == pytest.approx(20.0)
    assert rows[TID0 + 1]["PROGRAM"] == "dark"
    assert abs(np.median(stored_spectrum(tmp_path / "ard", TID0)["flux"]) - 7.0) < 0.2


def _write_zcat(path: Path, rows: list[tuple[int, str, str, bool]]) -> Path:
    t = Table()
    t["TARGETID"] = np.array([r[0] for r in rows], np.int64)
    t["SURVEY"] = np.array([r[1] for r in rows])
    t["PROGRAM"] = np.array([r[2] for r in rows])
    t["ZCAT_PRIMARY"] = np.array([r[3] for r in rows], bool)
    t["ZCAT_NSPEC"] = np.full(len(rows), 2, np.int16)
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(t, name="ZCATALOG")]).writeto(path)
    return path


def test_zcat_primary_overrides_the_rule(tmp_path, survey_dir):
    root, truth = survey_dir
    dup = truth["duplicate"]
    zcat = _write_zcat(tmp_path / "zpix-main.fits", [(dup, "main", "dark", False), (dup, "main", "bright", True)])
    out = tmp_path / "ard_zcat"
    report = run_build(root, out, zcat=str(zcat))
    assert not report.errors, report.errors
    rows = {r["TargetID"]: r for r in core_rows(out)}
    assert len(rows) == len(truth["targets"])
    assert rows[dup]["PROGRAM"] == "bright" and rows[dup]["ZWARN"] == 4 and rows[dup]["N_SPECTRA"] == 2
    assert rows[dup]["TSNR2_LRG"] == pytest.approx(500.0)
    assert abs(np.median(stored_spectrum(out, dup)["flux"]) - 50.0) < 0.5
    # Targets the catalog does not list keep the rule.
    assert all(r["PROGRAM"] == "dark" for t, r in rows.items() if t != dup)


def test_zcat_that_is_not_a_catalog_fails_clearly(tmp_path, survey_dir):
    from ard_sql.build.orchestrator import BuildFailed

    root, _ = survey_dir
    bad = tmp_path / "zbad.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"TARGETID": [1]}), name="ZCATALOG")]).writeto(bad)
    with pytest.raises(BuildFailed, match="ZCAT_PRIMARY"):
        run_build(root, tmp_path / "ard", zcat=str(bad))


# ------------------------------------------------------------------ bad inputs
BAD_TID = TID0 + 900_000


def _bad_truncated(root: Path) -> tuple[Path, int | None, str]:
    coadd, _ = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(BAD_TID + np.arange(4)))
    data = coadd.read_bytes()
    coadd.write_bytes(data[: len(data) // 2])
    return coadd, None, "truncated"


def _bad_missing_hdu(root: Path) -> tuple[Path, int | None, str]:
    coadd, _ = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(BAD_TID + np.arange(4), drop_hdus=("FIBERMAP",)))
    return coadd, None, "missing HDU FIBERMAP"


def _bad_missing_redshifts(root: Path) -> tuple[Path, int | None, str]:
    _, rr = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(BAD_TID + np.arange(4), drop_hdus=("REDSHIFTS",)))
    return rr, None, "missing HDU REDSHIFTS"


def _bad_row_mismatch(root: Path) -> tuple[Path, int | None, str]:
    coadd, _ = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(BAD_TID + np.arange(4), fibermap_extra_rows=2))
    return coadd, None, "FIBERMAP has 6 rows but B_FLUX has 4"


def _bad_orphan_redrock(root: Path) -> tuple[Path, int | None, str]:
    coadd, rr = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(BAD_TID + np.arange(4)))
    coadd.unlink()
    return rr, None, "redrock file without its coadd"


def _bad_target_without_redshift(root: Path) -> tuple[Path, int | None, str]:
    tid = BAD_TID + np.arange(4)
    _, rr = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(tid, redrock_targetid=tid[:3]))
    return rr, int(tid[3]), "no row in the redrock file"


def _bad_redshift_twice(root: Path) -> tuple[Path, int | None, str]:
    tid = BAD_TID + np.arange(4)
    _, rr = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(tid, redrock_targetid=np.r_[tid, tid[1]]))
    return rr, None, f"REDSHIFTS lists TargetID {tid[1]} on more rows than the coadd's FIBERMAP"


def _bad_empty_redshifts(root: Path) -> tuple[Path, int | None, str]:
    tid = BAD_TID + np.arange(4)
    _, rr = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(tid, redrock_targetid=tid[:0]))
    return rr, None, "REDSHIFTS HDU has no rows"


def _rewrite_hdu(path: Path, name: str, hdu) -> None:
    with fits.open(path) as hdul:
        hdus = [hdu if h.name == name else h.copy() for h in hdul]
    fits.HDUList(hdus).writeto(path, overwrite=True)


def _bad_fibermap_without_targetid(root: Path) -> tuple[Path, int | None, str]:
    coadd, _ = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(BAD_TID + np.arange(4)))
    fm = Table.read(coadd, hdu="FIBERMAP")
    fm.remove_column("TARGETID")
    _rewrite_hdu(coadd, "FIBERMAP", fits.BinTableHDU(fm, name="FIBERMAP"))
    return coadd, None, "FIBERMAP HDU has no TARGETID column"


def _bad_one_dimensional_flux(root: Path) -> tuple[Path, int | None, str]:
    coadd, _ = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(BAD_TID + np.arange(4)))
    with fits.open(coadd) as hdul:
        flat = np.asarray(hdul["B_FLUX"].data[0])
    _rewrite_hdu(coadd, "B_FLUX", fits.ImageHDU(flat, name="B_FLUX"))
    return coadd, None, "B_FLUX has 1 axes, not 2"


#: kind -> (writer, targets of the bad file that still get in the core)
ERROR_KINDS = {
    "redshift_twice": (_bad_redshift_twice, 0),
    "empty_redshifts": (_bad_empty_redshifts, 0),
    "fibermap_without_targetid": (_bad_fibermap_without_targetid, 0),
    "one_dimensional_flux": (_bad_one_dimensional_flux, 0),
    "truncated": (_bad_truncated, 0),
    "missing_hdu": (_bad_missing_hdu, 0),
    "missing_redshifts_hdu": (_bad_missing_redshifts, 0),
    "fibermap_rows_disagree": (_bad_row_mismatch, 0),
    "redrock_without_coadd": (_bad_orphan_redrock, 0),
    "target_without_redshift": (_bad_target_without_redshift, 3),
}


def _nan_flux_spec(tid0: int) -> tuple[PairSpec, int]:
    tid = tid0 + np.arange(3)
    flux = np.full((3, len(arm_wave("B"))), 2.0, np.float32)
    flux[1, 100:110] = np.nan
    return PairSpec(tid, arm_flux={"B": flux}), int(tid[1])


def _negative_ivar_spec(tid0: int) -> tuple[PairSpec, int]:
    tid = tid0 + np.arange(3)
    ivar = np.full((3, len(arm_wave("R"))), 4.0, np.float32)
    ivar[2, 1000:1010] = -3.0
    return PairSpec(tid, arm_ivar={"R": ivar}), int(tid[2])


@pytest.fixture(scope="module")
def bad_survey(tmp_path_factory):
    """One survey holding every bad input (each in its own pixel, own targets), built once."""
    base = tmp_path_factory.mktemp("bad")
    root = base / "survey"
    truth = write_small_survey(root)
    cases: dict[str, tuple[Path, int | None, str, int]] = {}
    for i, (kind, (writer, kept)) in enumerate(sorted(ERROR_KINDS.items())):
        sub = base / f"tmp_{kind}"
        path, target, reason = writer(sub)
        # Move the pair into the survey, in a pixel of its own.
        rel = path.parent.relative_to(sub)
        dest = root / rel.parent / f"{BAD_PIXEL + i}"
        shutil.copytree(path.parent, dest)
        shift = {}
        for f in list(dest.iterdir()):
            new = f.with_name(f.name.replace(str(BAD_PIXEL), str(BAD_PIXEL + i)))
            f.rename(new)
            shift[f.name] = new
        cases[kind] = (shift[path.name], None if target is None else target, reason, kept)
        # Different TargetIDs per bad file: rewrite with an offset is not needed since no row of
        # a failing file gets in, except for target_without_redshift (kept rows are its own).
    pixel = BAD_PIXEL + 50
    nan_spec, nan_target = _nan_flux_spec(BAD_TID + 1000)
    nan_coadd, _ = write_pair(root, "main", "dark", pixel, nan_spec)
    neg_spec, neg_target = _negative_ivar_spec(BAD_TID + 2000)
    neg_coadd, _ = write_pair(root, "main", "dark", pixel + 1, neg_spec)
    dup_tid = np.array([BAD_TID + 3000, BAD_TID + 3001, BAD_TID + 3000, BAD_TID + 3002])
    dup_coadd, _ = write_pair(root, "main", "dark", pixel + 2, PairSpec(dup_tid, flux_level=np.array([3.0, 1.0, 9.0, 1.0])))
    out = base / "ard"
    report = run_build(root, out)
    return {
        "root": root, "out": out, "report": report, "truth": truth, "cases": cases,
        "pixels": {"nan_flux": (nan_coadd, nan_target, grid.arm_slice("B").start + 100),
                   "negative_ivar": (neg_coadd, neg_target, grid.arm_slice("R").start + 1000)},
        "dup": (dup_coadd, int(dup_tid[0])),
        "n_good": len(truth["targets"]) + sum(c[3] for c in cases.values()) + 3 + 3 + 3,
    }


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
def test_bad_input_is_reported_and_the_rest_builds(bad_survey, kind):
    bad_file, bad_target, reason, _ = bad_survey["cases"][kind]
    report, out = bad_survey["report"], bad_survey["out"]
    hits = [p for p in report.errors if p.file == str(bad_file) and reason in p.reason]
    assert hits, [str(p) for p in report.problems]
    if bad_target is not None:
        assert any(p.target == bad_target for p in hits)
    assert str(bad_file) in str(hits[0])  # the message names the file
    # build-report.json lists it.
    data = json.loads((out / "build-report.json").read_text())
    listed = [p for p in data["problems"] if p.get("file") == str(bad_file) and reason in p["reason"]]
    assert listed and listed[0]["severity"] == "error" and str(bad_file) in listed[0]["message"]
    if bad_target is not None:
        assert any(p.get("target") == bad_target for p in listed)


def test_bad_inputs_do_not_stop_the_other_files(bad_survey):
    out = bad_survey["out"]
    rows = core_rows(out, "TargetID")
    assert len(rows) == bad_survey["n_good"]
    assert set(bad_survey["truth"]["targets"]) <= {r["TargetID"] for r in rows}
    data = json.loads((out / "build-report.json").read_text())
    assert data["n_errors"] == len(bad_survey["report"].errors) >= len(ERROR_KINDS)


@pytest.mark.parametrize("kind", ["nan_flux", "negative_ivar"])
def test_bad_pixels_are_masked_and_reported(bad_survey, kind):
    coadd, target, start = bad_survey["pixels"][kind]
    report, out = bad_survey["report"], bad_survey["out"]
    hits = [p for p in report.problems if p.file == str(coadd) and p.target == target and "masked" in p.reason]
    assert hits and "10 pixels" in hits[0].reason, [str(p) for p in report.problems]
    assert not [p for p in report.errors if p.file == str(coadd)]  # the spectrum is kept (repaired), not skipped
    data = json.loads((out / "build-report.json").read_text())
    assert any(p.get("target") == target and p.get("file") == str(coadd) for p in data["problems"])
    s = stored_spectrum(out, target)
    flux, ivar, mask = (np.asarray(s[k]) for k in ("flux", "ivar", "mask"))
    assert np.all(np.isfinite(flux))
    assert np.all(ivar[start: start + 10] == 0)
    assert np.all(mask[start: start + 10] & combine.BADVALUE)
    assert ivar[start + 10] > 0
    row = core_rows(out, "SNR_Median", f"TargetID = {target}")[0]
    assert np.isfinite(row["SNR_Median"])


def test_duplicate_target_inside_one_file(bad_survey):
    coadd, tid = bad_survey["dup"]
    report, out = bad_survey["report"], bad_survey["out"]
    hits = [p for p in report.problems if p.file == str(coadd) and p.target == tid and "duplicate" in p.reason.lower()]
    assert hits, [str(p) for p in report.problems]
    data = json.loads((out / "build-report.json").read_text())
    assert any(p.get("target") == tid and "duplicate" in p["reason"].lower() for p in data["problems"])
    rows = core_rows(out, "TargetID, N_SPECTRA", f"TargetID BETWEEN {tid} AND {tid + 2}")
    assert [r["TargetID"] for r in rows] == [tid, tid + 1, tid + 2]
    assert rows[0]["N_SPECTRA"] == 1
    assert abs(np.median(stored_spectrum(out, tid)["flux"]) - 3.0) < 0.3  # the first row is kept


def _built_small_survey(tmp_path: Path) -> tuple[Path, dict, Path]:
    """The small survey, built once without errors: (survey root, its truth, ARD folder)."""
    root = tmp_path / "survey"
    truth = write_small_survey(root)
    out = tmp_path / "ard"
    assert not run_build(root, out).errors
    return root, truth, out


def test_a_target_its_file_cannot_give_now_keeps_its_built_row(tmp_path):
    """One target gone bad in a file that still reads (NaN position): reported, and its row is not lost on a rebuild."""
    root, truth, out = _built_small_survey(tmp_path)
    before = core_rows(out, "TargetID, SNR_Median")
    coadd = root / "healpix/main/dark/1/101/coadd-main-dark-101.fits"
    with fits.open(coadd, mode="update") as hdul:
        hdul["FIBERMAP"].data["TARGET_RA"][1] = np.nan
        bad = int(hdul["FIBERMAP"].data["TARGETID"][1])
    report = run_build(root, out)
    assert any(p.file == str(coadd) and p.target == bad for p in report.errors), [str(p) for p in report.problems]
    assert any("kept as previously built" in p.reason for p in report.problems)
    assert core_rows(out, "TargetID, SNR_Median") == before


def test_a_target_left_out_at_the_first_build_does_not_freeze_its_partition(tmp_path):
    """A target bad from the start (NaN position) is left out and reported; it is no reason to keep the partition as
    built when another of its targets changes (the next build must still update it)."""
    root = tmp_path / "survey"
    write_small_survey(root)
    coadd = root / "healpix/main/dark/1/101/coadd-main-dark-101.fits"
    with fits.open(coadd, mode="update") as hdul:
        hdul["FIBERMAP"].data["TARGET_RA"][1] = np.nan
        bad = int(hdul["FIBERMAP"].data["TARGETID"][1])
        other = int(hdul["FIBERMAP"].data["TARGETID"][2])
    out = tmp_path / "ard"
    assert [p.target for p in run_build(root, out).errors] == [bad]
    redrock = coadd.with_name(coadd.name.replace("coadd-", "redrock-"))
    with fits.open(redrock, mode="update") as hdul:
        z = hdul["REDSHIFTS"].data
        z["Z"][z["TARGETID"] == other] = 0.4242
    report = run_build(root, out)
    assert [p.target for p in report.errors] == [bad]  # still reported...
    assert not any("kept as previously built" in p.reason for p in report.problems)  # ...but nothing frozen
    assert core_rows(out, "Z", f"TargetID = {other}")[0]["Z"] == pytest.approx(0.4242)
    assert not core_rows(out, "TargetID", f"TargetID = {bad}")


def test_a_coadd_unreadable_at_the_first_build_is_read_again_at_the_next(tmp_path, monkeypatch):
    """Targets left out because a coadd failed at read time (a passing I/O error): the partition is not marked
    finished, so the next build, with the file unchanged and readable, ingests them."""
    from ard_sql.build.ingest import desi_io

    root = tmp_path / "survey"
    truth = write_small_survey(root)
    coadd = root / "healpix/main/dark/1/101/coadd-main-dark-101.fits"
    real = desi_io.read_arms

    def flaky(path, rows):
        if Path(path) == coadd:
            raise BadInput("read error (simulated I/O failure)", path)
        return real(path, rows)

    monkeypatch.setattr(desi_io, "read_arms", flaky)
    out = tmp_path / "ard"
    report = run_build(root, out)
    assert report.layers["core"]["targets_left_out"] == 6
    assert len(core_rows(out, "TargetID")) == len(truth["targets"]) - 6
    monkeypatch.setattr(desi_io, "read_arms", real)
    report = run_build(root, out)
    assert not report.errors and len(core_rows(out, "TargetID")) == len(truth["targets"])


def test_gzip_compressed_files_ingest_as_the_plain_ones(tmp_path):
    """``.fits.gz`` pairs give the same rows and spectra as the plain files (they used to be refused as truncated)."""
    import gzip

    plain = tmp_path / "plain"
    write_small_survey(plain)
    packed = tmp_path / "packed"
    shutil.copytree(plain, packed)
    for f in packed.rglob("*.fits"):
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    a, b = tmp_path / "a", tmp_path / "b"
    assert not run_build(plain, a).errors
    report = run_build(packed, b)
    assert not report.errors, [str(p) for p in report.problems]
    cols = "TargetID, Z, SNR_Median, SNR_B, N_SPECTRA"
    rows = core_rows(a, cols)
    assert core_rows(b, cols) == rows and len(rows) > 20
    tids = [r["TargetID"] for r in rows]
    sa, sb = stored_spectra(a, tids), stored_spectra(b, tids)
    for t in tids:
        for key in ("flux", "ivar", "mask"):
            assert np.array_equal(np.asarray(sa[t][key]), np.asarray(sb[t][key]), equal_nan=True), (t, key)


def test_a_rebuild_from_a_parent_folder_still_keeps_rows_of_an_unreadable_file(tmp_path):
    """SOURCE_FILE is relative to the build's source folder: built from healpix/main, rebuilt from the survey root
    with one coadd truncated and another file of its partition changed, the partition keeps that coadd's rows."""
    root = tmp_path / "survey"
    truth = write_small_survey(root)
    out = tmp_path / "ard"
    assert not run_build(root / "healpix" / "main", out).errors
    before = core_rows(out, "TargetID")
    coadd = root / "healpix/main/dark/1/101/coadd-main-dark-101.fits"
    data = coadd.read_bytes()
    coadd.write_bytes(data[: len(data) // 2])
    redrock = root / "healpix/main/dark/1/100/redrock-main-dark-100.fits"
    with fits.open(redrock, mode="update") as hdul:
        hdul["REDSHIFTS"].data["Z"][0] += 0.01
    report = run_build(root, out)
    assert any(p.file == str(coadd) and "truncated" in p.reason for p in report.errors)
    assert any("kept as previously built" in p.reason for p in report.problems), [str(p) for p in report.problems]
    assert core_rows(out, "TargetID") == before and len(before) == len(truth["targets"])


def test_a_layer_returning_rows_out_of_core_order_is_refused(core_ard, monkeypatch):
    """Positions are attached to a layer's rows by row number: a layer must return the core's rows in its order."""
    import pyarrow as pa

    from ard_sql.build import orchestrator

    class Reversing:
        def run(self, part):
            tid = part.core.column("TargetID").to_numpy()[::-1]
            return pa.table({"TargetID": tid})

    monkeypatch.setattr(orchestrator, "load_layer_class", lambda name: Reversing)
    order, pixel, _ = hats_writer.partition_files(core_ard, "core")[0]
    with pytest.raises(ValueError, match="another order than the core's"):
        orchestrator.layer_task(str(core_ard), "lick", order, pixel, {})


def test_failed_rebuild_keeps_the_finished_ard(tmp_path):
    root, truth, out = _built_small_survey(tmp_path)
    before = core_rows(out, "TargetID, SNR_Median")
    assert len(before) == len(truth["targets"])
    # Corrupt one source file of a partition that also holds other files' targets.
    coadd = root / "healpix/main/dark/1/101/coadd-main-dark-101.fits"
    data = coadd.read_bytes()
    coadd.write_bytes(data[: len(data) // 3])
    report = run_build(root, out)
    assert any(p.file == str(coadd) for p in report.errors), [str(p) for p in report.problems]
    after = core_rows(out, "TargetID, SNR_Median")
    assert after == before  # every previously built row is still there, unchanged
    spectra = stored_spectra(out, [r["TargetID"] for r in before])
    assert all(spectra[r["TargetID"]] is not None for r in before)
    # Remove the corrupt file altogether: still an ARD that opens, with every row.
    shutil.rmtree(coadd.parent)
    with ard_sql.open(out) as db:
        assert db.sql("SELECT count(*) FROM ard").fetchall()[0][0] >= len(truth["targets"]) - 6


def test_rebuild_keeps_partition_when_a_coadd_fails_at_read_time(tmp_path):
    """A coadd that passes the metadata scan but whose flux cannot be read leaves the finished partition as it was."""
    root, truth, out = _built_small_survey(tmp_path)
    before = core_rows(out, "TargetID, SNR_Median, SPEC_FILE, SPEC_ROW")
    spectra_before = stored_spectra(out, [r["TargetID"] for r in before])
    state_before = paths.state_file(out, "core").read_text()
    # Shift B_WAVELENGTH off the brz grid: the scan (metadata only) passes, reading the arms fails.
    coadd = root / "healpix/main/dark/1/101/coadd-main-dark-101.fits"
    with fits.open(coadd, mode="update") as hdul:
        hdul["B_WAVELENGTH"].data = hdul["B_WAVELENGTH"].data + 0.3
    report = run_build(root, out)
    hits = [p for p in report.errors if p.file == str(coadd)]
    assert hits and "B_WAVELENGTH" in hits[0].reason, [str(p) for p in report.problems]
    assert "kept as previously built" in str(hits[0])
    assert report.layers["core"]["kept_unreadable_source"] == 1
    after = core_rows(out, "TargetID, SNR_Median, SPEC_FILE, SPEC_ROW")
    assert len(after) == len(before) == len(truth["targets"])
    assert after == before
    spectra_after = stored_spectra(out, [r["TargetID"] for r in before])
    for tid, spec in spectra_before.items():
        assert np.array_equal(np.asarray(spectra_after[tid]["flux"]), np.asarray(spec["flux"]), equal_nan=True), tid
    assert paths.state_file(out, "core").read_text() == state_before  # not marked finished with the new input
    # Once the file is fixed, the next build rebuilds that partition with every target.
    with fits.open(coadd, mode="update") as hdul:
        hdul["B_WAVELENGTH"].data = hdul["B_WAVELENGTH"].data - 0.3
    assert not run_build(root, out).errors
    assert len(core_rows(out, "TargetID")) == len(truth["targets"])


def test_failed_partition_write_leaves_old_files(tmp_path, monkeypatch):
    """A crash while writing a partition's core file leaves the previous core file and working spectra."""
    root, truth, out = _built_small_survey(tmp_path)
    before = core_rows(out, "TargetID, SNR_Median, SPEC_FILE, SPEC_ROW")
    parquet = sorted((out / "staging/core/dataset").rglob("Npix=*.parquet"))
    snapshot = {f: f.read_bytes() for f in parquet}
    # The source changes (new targets shift the rows of partition 0), then the core write fails.
    write_pair(root, "main", "dark", 99, PairSpec(TID0 + 5000 + np.arange(5), flux_level=np.full(5, 77.0, np.float32)), seed=5)
    from ard_sql.build import hats_writer

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hats_writer, "write_partition", boom)
    report = run_build(root, out)
    assert report.errors and all("disk full" in p.reason for p in report.errors), [str(p) for p in report.problems]
    assert {f: f.read_bytes() for f in parquet} == snapshot
    assert not [f for f in out.rglob("*") if ".tmp-" in f.name]
    assert core_rows(out, "TargetID, SNR_Median, SPEC_FILE, SPEC_ROW") == before
    # spectrum() still gives each old target its own spectrum.
    spectra = stored_spectra(out, list(truth["targets"]))
    for tid, info in truth["targets"].items():
        assert abs(np.median(spectra[tid]["flux"]) - info["level"]) < 0.3, tid
    monkeypatch.undo()
    report = run_build(root, out)  # the next build finishes the job
    assert not report.errors
    assert len(core_rows(out, "TargetID")) == len(truth["targets"]) + 5


# ------------------------------------------------------------------ re-runs
def test_rerun_skips_unchanged_and_rebuilds_changed(tmp_path):
    root = tmp_path / "survey"
    truth = write_small_survey(root)
    out = tmp_path / "ard"
    first = run_build(root, out)
    nparts = first.layers["core"]["partitions"]
    assert first.layers["core"]["built"] == nparts and first.layers["core"]["skipped_unchanged"] == 0
    second = run_build(root, out)
    assert second.layers["core"]["built"] == 0 and second.layers["core"]["skipped_unchanged"] == nparts
    # Change one file (pixel 40000: its own partition): only that partition is rebuilt.
    tid = TID0 + 300 + np.arange(6)
    write_pair(root, "main", "dark", 40000, PairSpec(tid, flux_level=np.full(6, 30.0, np.float32)), seed=3)
    mtimes = {f: f.stat().st_mtime_ns for f in (out / "staging/core/dataset").rglob("*.parquet")}
    third = run_build(root, out)
    assert third.layers["core"]["built"] == 1 and third.layers["core"]["skipped_unchanged"] == nparts - 1
    changed = [f for f in mtimes if f.stat().st_mtime_ns != mtimes[f]]
    assert len(changed) == 1
    assert abs(np.median(stored_spectrum(out, int(tid[0]))["flux"]) - 30.0) < 0.2
    assert len(core_rows(out, "TargetID")) == len(truth["targets"])
    # A new file whose path sorts first (every other file's rank shifts) rebuilds only the partition it joins.
    write_pair(root, "main", "backup", 40000, PairSpec(TID0 + 900 + np.arange(2)), seed=4)
    fourth = run_build(root, out)
    assert fourth.layers["core"]["built"] == 1 and fourth.layers["core"]["skipped_unchanged"] == nparts - 1
    # --force rebuilds every partition.
    assert run_build(root, out, force=True).layers["core"]["built"] == nparts


def test_deleted_source_partition_is_removed_by_a_clean_build(tmp_path):
    root = tmp_path / "survey"
    truth = write_small_survey(root)
    out = tmp_path / "ard"
    run_build(root, out)
    spectra_before = {f.name for f in (out / "spectra").rglob("*.h5")}
    shutil.rmtree(root / "healpix/main/dark/400")  # pixel 40000: a partition of its own
    report = run_build(root, out)
    assert not report.errors
    rows = core_rows(out, "TargetID, HEALPIX")
    assert len(rows) == len(truth["targets"]) - 6 and all(r["HEALPIX"] != 40000 for r in rows)
    # its spectra file went with it; the others stay
    spectra_after = {f.name for f in (out / "spectra").rglob("*.h5")}
    assert len(spectra_after) == len(spectra_before) - 1 and spectra_after < spectra_before


def test_removing_a_partition_in_a_core_only_build_refreshes_the_other_layers_catalog_files(tmp_path):
    """A layer not run in the build that removes a partition still gets its HATS files rewritten (LSDB/HATS readers
    would otherwise look for the removed file); a layer left with no partition loses them."""
    import pandas as pd

    root = tmp_path / "survey"
    write_small_survey(root)
    out = tmp_path / "ard"
    assert not build(BuildOptions(source=str(root), out=str(out), layers=["lick"], scheduler="sync", progress=False)).errors
    lick = paths.staging_dir(out, "lick")
    before = pd.read_csv(lick / "partition_info.csv")
    shutil.rmtree(root / "healpix/main/dark/400")  # pixel 40000: a partition of its own
    assert not run_build(root, out).errors  # core only: lick is not run
    after = pd.read_csv(lick / "partition_info.csv")
    files = {(o, p) for o, p, _ in hats_writer.partition_files(out, "lick")}
    assert len(after) == len(before) - 1 and set(zip(after.Norder, after.Npix)) == files
    assert pq.read_metadata(lick / "dataset" / "_metadata").num_rows == sum(
        pq.read_metadata(f).num_rows for _, _, f in hats_writer.partition_files(out, "lick"))
    hats_writer.remove_partitions(out, "lick", set())
    assert hats_writer.finalize_catalog(out, "lick") == 0
    assert not (lick / "partition_info.csv").exists() and not (lick / "hats.properties").exists()


# ------------------------------------------------------------------ a failing layer, provenance
def _meta(ard: Path) -> dict[tuple[str, str], str]:
    with ard_sql.open(ard) as db:
        return {(s, n): v for s, n, v in db.sql("SELECT section, name, value FROM ard_meta").fetchall()}


def test_a_failing_layer_is_reported_and_the_build_finishes(tmp_path):
    """A layer that raises (embed with nothing to train on) is a problem of the report, not the end of the build."""
    from typer.testing import CliRunner

    from ard_sql.build.orchestrator import FAILED
    from ard_sql.cli import app

    root = tmp_path / "survey"
    write_small_survey(root)
    out = tmp_path / "ard"
    first = build(BuildOptions(source=str(root), out=str(out), layers=["lick"], scheduler="sync", progress=False))
    assert not first.errors, [str(p) for p in first.errors]
    with ard_sql.open(out) as db:
        lick_before = db.sql("SELECT TargetID, Dn4000, Hdelta_A FROM ard ORDER BY TargetID").fetchall()
    meta_before = _meta(out)
    db_inode = paths.db_path(out).stat().st_ino
    (out / "build-report.json").unlink()
    # embed first, lick after it: the later layer still runs.
    report = build(BuildOptions(out=str(out), layers=["embed", "lick"], scheduler="sync", progress=False,
                                layer_options={"embed": {"train_min_snr": 1e9}}, force=True))
    hits = [p for p in report.errors if p.layer == "embed"]
    assert hits and "ValueError" in hits[0].reason and "no galaxy spectrum" in hits[0].reason, \
        [str(p) for p in report.problems]
    assert report.layers["embed"]["status"] == FAILED
    assert report.layers["lick"]["built"] == report.layers["lick"]["partitions"] > 0
    data = json.loads((out / "build-report.json").read_text())
    assert any(p["layer"] == "embed" and "no galaxy spectrum" in p["reason"] for p in data["problems"])
    with ard_sql.open(out) as db:
        assert db.sql("SELECT TargetID, Dn4000, Hdelta_A FROM ard ORDER BY TargetID").fetchall() == lick_before
    assert paths.db_path(out).stat().st_ino != db_inode  # ard.duckdb was written again (renamed into place)
    meta_after = _meta(out)
    assert meta_after[("layer", "lick")] == meta_before[("layer", "lick")]
    assert ("layer", "embed") not in meta_after  # no version recorded for a layer that never finished
    assert not paths.state_file(out, "embed").exists() or paths.state_file(out, "embed").read_text() in ("{}", "")
    # The command line exits 1 (even with --keep-going) and says where the report is.
    res = CliRunner().invoke(app, ["build", "--out", str(out), "--layers", "embed", "--scheduler", "sync", "--no-progress",
                                   "--set", "embed.train_min_snr=1e9", "--keep-going"], catch_exceptions=False)
    text = "".join(res.output.split())  # rich wraps long paths mid-word
    assert res.exit_code == 1, res.output
    assert "layer(s)embedfailed" in text and f"{out}/build-report.json".replace(" ", "") in text


def test_a_layer_failing_after_its_core_changed_drops_its_old_values(tmp_path, monkeypatch):
    """Old layer values never sit beside a changed core: a failed partition whose core inputs changed reads NULL
    (its layer file and its wide file gone). A partition whose core did not change keeps its values through the
    same failure, --force included."""
    from ard_sql.build import compaction
    from ard_sql.build.layers.lick import LickLayer

    root = tmp_path / "survey"
    write_small_survey(root)
    out = tmp_path / "ard"
    lick = dict(layers=["lick"], scheduler="sync", progress=False)
    first = build(BuildOptions(source=str(root), out=str(out), **lick))
    assert not first.errors, [str(p) for p in first.errors]
    before = {(o, p) for o, p, _ in hats_writer.partition_files(out, paths.CORE)}
    with ard_sql.open(out) as db:
        changed = db.sql("SELECT DISTINCT HEALPIX FROM core WHERE HEALPIX = 40000").fetchall()
    assert changed  # pixel 40000 is a partition of its own: two new targets change its core only
    write_pair(root, "main", "backup", 40000, PairSpec(TID0 + 900 + np.arange(2)), seed=4)
    for o, p in before:  # as a layer that writes model spectra (ppxf) leaves them
        paths.model_file(out, "lick", o, p).parent.mkdir(parents=True, exist_ok=True)
        paths.model_file(out, "lick", o, p).write_bytes(b"old fit")

    def broken(self, part):
        raise RuntimeError("lick exploded")

    monkeypatch.setattr(LickLayer, "run", broken)
    report = build(BuildOptions(source=str(root), out=str(out), **lick))
    hits = [x for x in report.errors if x.layer == "lick"]
    assert len(hits) == 1 and "lick exploded" in hits[0].reason and "earlier core were removed" in hits[0].reason
    o, p = hits[0].order, hits[0].pixel
    assert not paths.partition_file(out, o, p, "lick").exists() and not paths.model_file(out, "lick", o, p).exists()
    kept = before - {(o, p)}
    assert all(paths.model_file(out, "lick", ko, kp).exists() for ko, kp in kept)
    assert kept and all(paths.partition_file(out, ko, kp, "lick").exists() for ko, kp in kept)
    assert paths.partition_file(out, o, p, compaction.WIDE).exists()  # rewritten without the dropped values
    with ard_sql.open(out) as db:
        rows = db.sql("SELECT HEALPIX = 40000 AS changed, count(Dn4000), count(*) FROM ard GROUP BY ALL").fetchall()
    counts = {c: (n_lick, n) for c, n_lick, n in rows}
    assert counts[True][0] == 0 and counts[True][1] == 8 and counts[False][0] > 0
    # --force with the core unchanged: every partition fails, none loses its values
    again = build(BuildOptions(out=str(out), force=True, **lick))
    assert sum(x.layer == "lick" for x in again.errors) == len(before)
    assert not any("earlier core" in x.reason for x in again.errors)
    assert all(paths.partition_file(out, ko, kp, "lick").exists() for ko, kp in kept)


def test_unreadable_provenance_stops_the_build_and_keeps_the_database(tmp_path):
    """A database that exists but cannot be read is never taken as "no provenance" (and then overwritten)."""
    import subprocess
    import sys

    import duckdb

    from ard_sql.build import database
    from ard_sql.build.orchestrator import BuildFailed

    assert database.read_provenance(tmp_path / "nothing") is None  # no ard.duckdb: a first build
    root = tmp_path / "survey"
    write_small_survey(root, n_per_pixel=2)
    out = tmp_path / "ard"
    assert not run_build(root, out).errors
    db = paths.db_path(out)
    assert database.read_provenance(out).source == str(root.resolve())
    # Locked by another process that writes to it.
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); sys.stdin.read()", str(db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        snapshot = db.read_bytes()
        with pytest.raises(BuildFailed, match="lock") as err:
            run_build(root, out)
        assert str(db) in str(err.value)
        assert db.read_bytes() == snapshot
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # A file without ard_meta, and one that is not a DuckDB database at all.
    db.unlink()
    duckdb.connect(str(db)).close()
    with pytest.raises(BuildFailed, match="ard_meta") as err:
        database.read_provenance(out)
    assert str(db) in str(err.value)
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(BuildFailed) as err:
        database.read_provenance(out)
    assert str(db) in str(err.value)


# ------------------------------------------------------------------ layer options
@pytest.mark.parametrize("layer, given, says", [
    ("ppxf", {"mode": "bogus"}, "mode must be one of"),
    ("ppxf", {"templates": "/no/such/templates.npz"}, "templates /no/such/templates.npz: no such file"),
    ("lick", {"max_bad_fraction": 0.3}, "unknown option"),
    ("embed", {"device": "nonesuch"}, "device 'nonesuch'"),
    ("embed", {"astroclip_checkpoint": "/no/such/weights.ckpt"}, "no such file"),
    ("topology", {"cosmology": "Planck99"}, "Planck99"),
    ("topology", {"lambda_th": [0.3, 0.2, 0.1]}, "lambda_th"),
    ("bagpipes", {"n_sims": "many"}, "many"),
    ("topology", {"smoothing": "abc"}, r"option smoothing='abc': must be a number > 0"),
    ("topology", {"completeness_min": 2}, "completeness_min=2: must be a number between 0 and 1"),
    ("lick", {"max_bad_frac": -1}, "max_bad_frac=-1: must be a number between 0 and 1"),
    ("lick", {"max_bad_frac": True}, "max_bad_frac=True: must be a number"),
    ("ppxf", {"reference_fraction": 1.5}, "reference_fraction=1.5: must be a number between 0 and 1"),
    ("embed", {"steps": 2.5}, "steps=2.5: must be an integer >= 1"),
    ("bagpipes", {"n_sims": 0}, "n_sims=0: must be an integer >= 1"),
])
def test_bad_layer_options_fail_before_any_work(tmp_path, survey_dir, layer, given, says):
    """A bad option fails at once, naming the layer's problem, before ingest writes anything."""
    from ard_sql.build.orchestrator import BuildFailed

    root, _ = survey_dir
    out = tmp_path / "ard"
    opts = BuildOptions(source=str(root), out=str(out), layers=[layer], scheduler="sync", progress=False,
                        layer_options={layer: given})
    with pytest.raises(BuildFailed, match=says):
        build(opts)
    assert not out.exists()


# ------------------------------------------------------------------ checksums (CHECKSUM / DATASUM)
def _add_checksums(path: Path) -> None:
    """Rewrite a FITS file with CHECKSUM/DATASUM cards on every HDU (as DESI and the mock write them)."""
    with fits.open(path, memmap=False) as hdul:
        hdul.readall()
        tmp = path.with_name(path.name + ".tmp")
        hdul.writeto(tmp, checksum=True)
    os.replace(tmp, path)


def _damage_data(path: Path, hdu: str, nbytes: int = 4000, skip: int = 100) -> None:
    """Invert ``nbytes`` bytes inside the data of one HDU (the file keeps its size and structure)."""
    with fits.open(path) as hdul:
        start = hdul[hdu].fileinfo()["datLoc"] + skip
        assert skip + nbytes <= hdul[hdu].size
    with open(path, "r+b") as f:
        f.seek(start)
        data = np.frombuffer(f.read(nbytes), np.uint8)
        f.seek(start)
        f.write((~data).tobytes())


def _checksummed_bad_pair(root: Path, n: int = 4) -> tuple[Path, Path, list[int]]:
    tid = BAD_TID + 5000 + np.arange(n)
    coadd, rr = write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(tid), seed=11)
    _add_checksums(coadd)
    _add_checksums(rr)
    return coadd, rr, [int(t) for t in tid]


def test_verify_checksum_agrees_with_astropy_and_names_file_and_hdu(tmp_path):
    from ard_sql.build.ingest import desi_io
    from ard_sql.build.report import BadInput

    coadd, rr, _ = _checksummed_bad_pair(tmp_path)
    for path in (coadd, rr):  # intact: every HDU passes, as astropy's own check says
        with fits.open(path) as hdul:
            for i, hdu in enumerate(hdul):
                assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1
                desi_io.verify_checksum(hdul, i, path)
    _damage_data(coadd, "R_FLUX")
    with fits.open(coadd) as hdul:
        assert hdul["R_FLUX"].verify_datasum() == 0  # astropy agrees the data is damaged
        desi_io.verify_checksum(hdul, "B_FLUX", coadd)  # the other HDUs are still fine
        with pytest.raises(BadInput) as err:
            desi_io.verify_checksum(hdul, "R_FLUX", coadd)
    assert str(coadd) in str(err.value) and "R_FLUX" in str(err.value) and "DATASUM" in str(err.value)
    # A damaged header (a value changed, same length) fails CHECKSUM, its data being intact.
    raw = coadd.read_bytes()
    assert raw.count(b"'main    '") == 1
    coadd.write_bytes(raw.replace(b"'main    '", b"'sv3     '"))
    with fits.open(coadd) as hdul:
        with pytest.raises(BadInput, match="HDU PRIMARY fails its checksum: its header and data do not match CHECKSUM"):
            desi_io.verify_checksum(hdul, 0, coadd)
    # HDUs without the cards (conftest's files, older writers) are accepted.
    plain, _ = write_pair(tmp_path / "plain", "main", "dark", BAD_PIXEL, PairSpec(BAD_TID + np.arange(2)))
    with fits.open(plain) as hdul:
        assert "CHECKSUM" not in hdul["R_FLUX"].header
        desi_io.verify_checksum(hdul, "R_FLUX", plain)


def test_corrupted_flux_is_not_ingested_and_its_targets_are_named(tmp_path):
    """A coadd whose R_FLUX fails its DATASUM is skipped on a first build; the report names it and its targets."""
    root = tmp_path / "survey"
    truth = write_small_survey(root)
    coadd, _, bad_tids = _checksummed_bad_pair(root)
    _damage_data(coadd, "R_FLUX")
    out = tmp_path / "ard"
    report = run_build(root, out)
    hits = [p for p in report.errors if p.file == str(coadd)]
    assert len(hits) == 1, [str(p) for p in report.problems]
    message = str(hits[0])
    assert "R_FLUX fails its checksum" in message and str(coadd) in message
    assert "4 target(s)" in message and all(str(t) in message for t in bad_tids)
    rows = {r["TargetID"] for r in core_rows(out, "TargetID")}
    assert rows == set(truth["targets"])  # none of the damaged file's targets got in
    assert report.layers["core"]["targets"] == len(rows) and report.layers["core"]["targets_left_out"] == len(bad_tids)
    data = json.loads((out / "build-report.json").read_text())
    assert data["layers"]["core"]["targets"] == len(rows)


def test_corrupted_file_on_rebuild_keeps_the_partition_and_the_count(tmp_path):
    """Damage found at read time (flux) or scan time (FIBERMAP) on a rebuild: the finished partition stands,
    and the summary counts what the ARD holds."""
    root = tmp_path / "survey"
    truth = write_small_survey(root)
    coadd, _, bad_tids = _checksummed_bad_pair(root)
    out = tmp_path / "ard"
    assert not run_build(root, out).errors
    before = core_rows(out, "TargetID, SNR_Median, SPEC_FILE, SPEC_ROW")
    assert len(before) == len(truth["targets"]) + len(bad_tids)
    spectra_before = stored_spectra(out, bad_tids)
    for hdu in ("R_FLUX", "FIBERMAP"):
        _damage_data(coadd, hdu, nbytes=64 if hdu == "FIBERMAP" else 4000, skip=8)
        report = run_build(root, out)
        hits = [p for p in report.errors if p.file == str(coadd)]
        assert hits and f"{hdu} fails its checksum" in hits[0].reason, [str(p) for p in report.problems]
        assert any("kept as previously built" in str(p) for p in report.problems)
        assert report.layers["core"]["kept_unreadable_source"] == 1
        assert report.layers["core"]["targets"] == len(before)  # not the readable files' count
        assert "targets_left_out" not in report.layers["core"]
        assert core_rows(out, "TargetID, SNR_Median, SPEC_FILE, SPEC_ROW") == before
        spectra_after = stored_spectra(out, bad_tids)
        for tid in bad_tids:
            assert np.array_equal(np.asarray(spectra_after[tid]["flux"]), np.asarray(spectra_before[tid]["flux"]))
        _damage_data(coadd, hdu, nbytes=64 if hdu == "FIBERMAP" else 4000, skip=8)  # inverted back: intact again
    assert not run_build(root, out).errors


@pytest.mark.parametrize("given, says", [
    ({"bagpipes": {"xyz": 1}}, r"bagpipes layer: unknown option\(s\) \['xyz'\]"),
    ({"ppxf": {"templates": "/no/such/templates.npz"}}, "templates /no/such/templates.npz: no such file"),
    ({"lick": {"max_bad_frac": -1}}, "max_bad_frac=-1"),
])
def test_options_of_layers_not_run_are_checked_too(tmp_path, survey_dir, given, says):
    """``--layers core --set bagpipes.xyz=1``: a layer not run still has its options checked, before any work."""
    from ard_sql.build.orchestrator import BuildFailed

    root, _ = survey_dir
    out = tmp_path / "ard"
    with pytest.raises(BuildFailed, match=says):
        build(BuildOptions(source=str(root), out=str(out), layers=[], scheduler="sync", progress=False,
                           layer_options=given))
    assert not out.exists()


def test_option_checks_unknown_layer_and_topology_names(tmp_path):
    from ard_sql.build.layers import topology
    from ard_sql.build.orchestrator import BuildFailed, check_layer_options
    from ard_sql.science.cosmicweb import WebOptions
    from dataclasses import fields

    opts = BuildOptions(out=str(tmp_path / "ard"), layers=[])
    opts.layer_options["nosuch"] = {"x": 1}  # past BuildOptions' own check (e.g. set after construction)
    with pytest.raises(BuildFailed, match="unknown layer 'nosuch'"):
        check_layer_options(opts, [])
    # The topology error's list of known options holds the layer's own (cosmology ...) and the T-web's.
    with pytest.raises(ValueError, match="known: .*cosmology.*smoothing"):
        topology.check_options({"xyz": 1})
    assert set(topology._WEB_OPTIONS) == {f.name for f in fields(WebOptions)}  # every T-web option is checked
    mine, web = topology.split_options({"cosmology": "Planck18", "smoothing": "4", "lambda_th": [0.1, 0.2, 0.3],
                                        "buffer": None, "knn": 5.0})
    assert mine == {"cosmology": "Planck18", "knn": 5} and web.smoothing == 4.0 and web.lambda_th == (0.1, 0.2, 0.3)


def test_option_converters_are_strict():
    from ard_sql.build.layers.base import count, fraction, integer, number, parse_options, text

    assert integer()(3) == 3 and integer()(3.0) == 3 and integer()("7") == 7 and count(0) == 0
    for bad in (2.5, True, "x", None, [1], float("nan")):
        with pytest.raises(ValueError, match="must be an integer"):
            integer()(bad)
    assert fraction(0) == 0.0 and fraction("0.5") == 0.5 and fraction(1) == 1.0
    for bad in (-0.1, 1.01, False, "abc", float("inf")):
        with pytest.raises(ValueError, match="between 0 and 1"):
            fraction(bad)
    with pytest.raises(ValueError, match="> 0"):
        number(above=0.0)(0)
    assert text("a") == "a" and text(12) == "12"
    with pytest.raises(ValueError, match="must be a string"):
        text(["a"])
    # plain types in a schema are checked just as strictly, and the message names layer, option and value
    with pytest.raises(ValueError, match=r"demo layer: option n=2\.5: must be an integer"):
        parse_options("demo", {"n": 2.5}, {"n": int})
    assert parse_options("demo", {"n": "3", "f": 1, "s": "x"}, {"n": int, "f": float, "s": str}) == {"n": 3, "f": 1.0, "s": "x"}
