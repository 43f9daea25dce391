"""Target-level decisions of the ingest: class, primary spectrum, partition order.

TARGET_CLASS
    Decoded from the survey's DESI_TARGET-style bitmask with desitarget's
    bit positions, which main, sv1, sv2 and sv3 share for the classes used
    here (``desitarget/data/targetmask.yaml``, ``sv*/data/sv*_targetmask.yaml``):
    LRG bit 0, ELG bit 1, QSO bit 2, BGS_ANY bit 60, MWS_ANY bit 61; a
    non-zero BGS_TARGET or MWS_TARGET also counts. The first class that
    matches, in the order LRG, ELG, QSO, BGS, MWS, wins; otherwise ``other``.
    Commissioning (cmx) bits follow another mask and decode as ``other``.

Primary spectrum of a target observed several times
    With a zpix catalog: the row with ZCAT_PRIMARY picks the (SURVEY,
    PROGRAM) whose spectrum is used. Otherwise (or when the catalog does not
    list the target) desispec's rule (``desispec.zcatalog.find_primary_spectra``):
    a spectrum with ZWARN == 0 beats one without, then the larger TSNR2_LRG
    wins; ties go to the first source file in path order.

Partition order
    HEALPix NESTED order K <= 6 (DESI healpix coadds are order 6, so a coadd
    maps into one partition): the smallest K whose largest partition holds at
    most ``max_rows`` targets (K = 6 when even order 6 exceeds it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ard_sql.build.report import BadInput

CLASS_BITS: tuple[tuple[str, int], ...] = (("LRG", 0), ("ELG", 1), ("QSO", 2), ("BGS", 60), ("MWS", 61))
MAX_ORDER = 6
DEFAULT_MAX_ROWS = 5000


def target_class(desi_target: np.ndarray, bgs_target: np.ndarray, mws_target: np.ndarray, survey: np.ndarray) -> np.ndarray:
    """Decoded TARGET_CLASS (object array of 'LRG', 'ELG', 'QSO', 'BGS', 'MWS', 'other')."""
    bits = np.asarray(desi_target, dtype=np.int64).view(np.uint64)
    out = np.full(len(bits), "other", dtype=object)
    decided = np.asarray(survey, dtype=object) == "cmx"
    for name, bit in CLASS_BITS:
        hit = ((bits >> np.uint64(bit)) & np.uint64(1)).astype(bool)
        if name == "BGS":
            hit |= np.asarray(bgs_target, dtype=np.int64) != 0
        elif name == "MWS":
            hit |= np.asarray(mws_target, dtype=np.int64) != 0
        sel = hit & ~decided
        out[sel] = name
        decided |= sel
    return out


def primary_by_rule(targetid: np.ndarray, zwarn: np.ndarray, tsnr2_lrg: np.ndarray, source_rank: np.ndarray) -> np.ndarray:
    """Boolean primary flag per spectrum by desispec's rule (ZWARN == 0 first, then largest TSNR2_LRG)."""
    tsnr = np.where(np.isfinite(tsnr2_lrg), tsnr2_lrg, -np.inf)
    # lexsort: last key is primary: TARGETID, then ZWARN != 0, then -TSNR2, then file order.
    order = np.lexsort((source_rank, -tsnr, np.asarray(zwarn) != 0, targetid))
    first = np.ones(len(order), dtype=bool)
    first[1:] = targetid[order][1:] != targetid[order][:-1]
    primary = np.zeros(len(targetid), dtype=bool)
    primary[order[first]] = True
    return primary


def read_zcatalog(path: Path | str) -> dict[int, tuple[str, str]]:
    """TARGETID -> (SURVEY, PROGRAM) of the ZCAT_PRIMARY rows of a zpix/zall catalog."""
    from astropy.io import fits

    from ard_sql.build.ingest.desi_io import _native, _strings, open_checked

    path = Path(path)
    with open_checked(path) as hdul:
        try:
            t = hdul["ZCATALOG"].data
        except KeyError:
            t = hdul[1].data if len(hdul) > 1 and isinstance(hdul[1], fits.BinTableHDU) else None
        if t is None:
            raise BadInput("no ZCATALOG table", file=path)
        names = {c.upper() for c in t.columns.names}
        missing = {"TARGETID", "SURVEY", "PROGRAM", "ZCAT_PRIMARY"} - names
        if missing:
            raise BadInput(f"zcatalog lacks column(s) {', '.join(sorted(missing))}", file=path)
        prim = np.asarray(t["ZCAT_PRIMARY"]).astype(bool)
        tid = _native(t["TARGETID"])[prim].astype(np.int64)
        survey = _strings(t["SURVEY"][prim])
        program = _strings(t["PROGRAM"][prim])
    return {int(a): (str(s).lower(), str(p).lower()) for a, s, p in zip(tid, survey, program)}


def primary_flags(
    targetid: np.ndarray,
    zwarn: np.ndarray,
    tsnr2_lrg: np.ndarray,
    survey: np.ndarray,
    program: np.ndarray,
    source_rank: np.ndarray,
    zcat: dict[int, tuple[str, str]] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(primary flag, number of spectra of the target) per spectrum; exactly one primary per target."""
    targetid = np.asarray(targetid, dtype=np.int64)
    uniq, inverse, counts = np.unique(targetid, return_inverse=True, return_counts=True)
    nspec = counts[inverse]
    primary = primary_by_rule(targetid, zwarn, tsnr2_lrg, source_rank)
    if zcat:
        want = np.array([zcat.get(int(t), ("", "")) for t in targetid], dtype=object).reshape(len(targetid), 2)
        match = (want[:, 0] == np.asarray(survey, dtype=object)) & (want[:, 1] == np.asarray(program, dtype=object))
        # Targets whose catalog choice is among the spectra found: that spectrum (first by rule order) wins.
        chosen = primary_by_rule(
            np.where(match, targetid, -1 - np.arange(len(targetid))), zwarn, tsnr2_lrg, source_rank
        ) & match
        has_choice = np.zeros(len(uniq), dtype=bool)
        has_choice[inverse[chosen]] = True
        primary = np.where(has_choice[inverse], chosen, primary)
    return primary, nspec


def choose_order(healpix64: np.ndarray, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Smallest order K <= 6 whose largest partition has at most ``max_rows`` targets."""
    pix = np.asarray(healpix64, dtype=np.int64)
    if len(pix) == 0:
        return 0
    for order in range(MAX_ORDER + 1):
        parent = pix >> (2 * (MAX_ORDER - order))
        if np.unique(parent, return_counts=True)[1].max() <= max_rows:
            return order
    return MAX_ORDER


def partition_pixel(healpix64: np.ndarray, order: int) -> np.ndarray:
    """Partition pixel at ``order`` of nside-64 NESTED pixels (the NESTED parent)."""
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"partition order must be 0-{MAX_ORDER} (DESI healpix coadds are order 6), got {order}")
    return np.asarray(healpix64, dtype=np.int64) >> (2 * (MAX_ORDER - order))
