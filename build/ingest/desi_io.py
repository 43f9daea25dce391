"""Read DESI coadd and redrock files as DESI publishes them (astropy only).

Discovery (:func:`discover`) walks a source folder recursively and pairs, in
each folder, ``coadd-<key>.fits`` with ``redrock-<key>.fits`` (or the older
``zbest-<key>.fits``), which covers the DR1 healpix layout
(``healpix/<survey>/<program>/<hpx//100>/<hpx>/coadd-<survey>-<program>-<hpx>.fits``),
flat folders and tile coadds (``coadd-<petal>-<tile>-thru<night>.fits``).

The scan (:func:`scan_group`) reads FIBERMAP, REDSHIFTS and TSNR2 of one
pair, never the flux, and checks the file: complete (not truncated), the
HDUs the ingest needs, FIBERMAP rows = flux rows, redrock rows matching the
coadd's targets. Columns an older file lacks come back as NULL (masked).
:func:`read_arms` reads the flux/ivar/mask of selected rows, memory-mapped.
Every HDU either reads is first checked against its CHECKSUM/DATASUM cards
(:func:`verify_checksum`; DESI and the mock write them, an HDU without them
is accepted), so a file damaged after it was written is never ingested.

Any problem raises :class:`~ard_sql.build.report.BadInput` naming the file
(and target) and the reason; per-target problems are returned as report
entries and the rest of the file is kept.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import healpy as hp
import numpy as np
from astropy.io import fits

from ard_sql import grid
from ard_sql.build.report import BadInput, Problem, targetid_list

#: nside of DESI's healpix grouping (NESTED): order 6.
DESI_NSIDE = 64
ARMS = ("B", "R", "Z")
#: Redrock's stars sit near z = 0, a little below it at most; a Z below this is not a redshift.
MIN_PLAUSIBLE_Z = -0.01
_NAME_RE = re.compile(r"^(coadd|redrock|zbest)-(.+?)\.fits(\.gz)?$")
_HEALPIX_KEY_RE = re.compile(r"^(?P<survey>[a-z0-9]+)-(?P<program>[a-z]+)-(?P<hpx>\d+)$")

#: FIBERMAP columns copied to the core table (NULL when a file lacks one).
FIBERMAP_FLOAT_COLUMNS = (
    "FLUX_G", "FLUX_R", "FLUX_Z", "FLUX_W1", "FLUX_W2",
    "FLUX_IVAR_G", "FLUX_IVAR_R", "FLUX_IVAR_Z", "FLUX_IVAR_W1", "FLUX_IVAR_W2", "EBV",
)
TARGET_BIT_COLUMNS = ("DESI_TARGET", "BGS_TARGET", "MWS_TARGET", "SCND_TARGET")
REDSHIFT_FLOAT_COLUMNS = ("Z", "ZERR", "CHI2", "DELTACHI2")
REDSHIFT_STRING_COLUMNS = ("SPECTYPE", "SUBTYPE")
TSNR2_COLUMNS = ("TSNR2_BGS", "TSNR2_LRG", "TSNR2_ELG", "TSNR2_QSO", "TSNR2_LYA")
_SURVEY_PREFIX = {"sv1": "SV1_", "sv2": "SV2_", "sv3": "SV3_", "cmx": "CMX_"}


@dataclass(frozen=True)
class SourceGroup:
    """A coadd file and its redrock file (either may be missing)."""

    key: str
    """Name part shared by both files, e.g. ``main-dark-10032`` or ``0-1000-thru20210515``."""
    coadd: Path | None
    redrock: Path | None


def discover(source: Path | str) -> tuple[list[SourceGroup], list[Problem]]:
    """Find every coadd/redrock pair under ``source`` (recursively).

    Returns the complete pairs, sorted by path, and a problem for each file
    without its partner (a redrock file without its coadd is skipped; so is a
    coadd without redshifts, since every layer needs Z).
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"source folder {source} does not exist")
    found: dict[tuple[Path, str], dict[str, Path]] = {}
    for path in sorted(source.rglob("*.fits*")):
        m = _NAME_RE.match(path.name)
        if not m or path.name.startswith("."):
            continue
        kind = "redrock" if m.group(1) in ("redrock", "zbest") else "coadd"
        entry = found.setdefault((path.parent, m.group(2)), {})
        if kind == "redrock" and "redrock" in entry and m.group(1) == "zbest":
            continue  # prefer redrock- over the older zbest- name
        entry[kind] = path
    groups, problems = [], []
    for (_, key), files in sorted(found.items(), key=lambda kv: str(kv[0])):
        coadd, redrock = files.get("coadd"), files.get("redrock")
        if coadd is None:
            problems.append(Problem("redrock file without its coadd (no coadd-%s.fits beside it)" % key, file=str(redrock)))
            continue
        if redrock is None:
            problems.append(Problem("coadd file without its redrock file (no redshifts: redrock-%s.fits missing)" % key, file=str(coadd)))
            continue
        groups.append(SourceGroup(key, coadd, redrock))
    return groups, problems


# ---------------------------------------------------------------- low-level FITS helpers
def is_gzip(path: Path) -> bool:
    """A gzip-compressed FITS file (``.fits.gz``): read through astropy, whose offsets are of the uncompressed bytes."""
    return Path(path).name.endswith(".gz")


def open_checked(path: Path) -> fits.HDUList:
    """Open a FITS file, checking it is readable and not truncated.

    A ``.fits.gz`` file is opened without memory mapping and its size is not compared with the HDU offsets (those
    are offsets into the uncompressed bytes); a truncated one fails when its data is read, which the callers report.
    """
    gz = is_gzip(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", category=fits.verify.VerifyWarning)
            hdul = fits.open(path, memmap=not gz, lazy_load_hdus=False)
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError... on corrupt files
        raise BadInput(f"cannot read FITS file ({type(exc).__name__}: {exc})", file=path) from exc
    if gz:
        return hdul
    size = path.stat().st_size
    for i, hdu in enumerate(hdul):
        info = hdu.fileinfo()
        need = info["datLoc"] + hdu.size  # data bytes, without the final padding
        if need > size:
            name = hdu.name or f"#{i}"
            hdul.close()
            raise BadInput(f"truncated FITS file: HDU {name} needs {need} bytes, the file has {size}", file=path)
    return hdul


#: Bytes summed per step when verifying a checksum (bounds the memory of a large HDU).
_CHECKSUM_CHUNK = 1 << 24


def _ones_complement_sum(path: Path, start: int, stop: int) -> int:
    """The FITS checksum sum (32-bit ones' complement, big-endian words) of bytes [start, stop) of a file.

    Bytes past the end of the file count as zero (a file whose last padding
    block is missing; the data itself was checked to be complete).
    """
    stop = min(stop, path.stat().st_size)
    if stop <= start:
        return 0
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(stop - start,))
    whole = (stop - start) // 4 * 4
    total = 0
    for lo in range(0, whole, _CHECKSUM_CHUNK):
        total += int(raw[lo:min(lo + _CHECKSUM_CHUNK, whole)].view(">u4").sum(dtype=np.uint64))
    if whole < stop - start:
        total += int.from_bytes(bytes(raw[whole:]).ljust(4, b"\0"), "big")
    del raw
    while total >> 32:  # end-around carry
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def verify_checksum(hdul: fits.HDUList, name: str | int, path: Path) -> None:
    """Check an HDU against its DATASUM and CHECKSUM cards; raise BadInput naming the file, the HDU and why.

    An HDU without the cards is accepted (older files, other writers). Only
    this HDU's bytes are read, so the ingest pays for the HDUs it uses. Call
    it before the HDU's data is accessed (gzip-compressed files go through
    astropy, which sums the data as loaded).
    """
    hdu = hdul[name]
    label = hdu.name or f"#{name}"
    header = hdu.header
    if "CHECKSUM" not in header and "DATASUM" not in header:
        return
    damaged = f"HDU {label} fails its checksum"
    if is_gzip(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data_ok = hdu.verify_datasum() != 0
            all_ok = hdu.verify_checksum() != 0
        if not data_ok:
            raise BadInput(f"{damaged}: its data does not match DATASUM (the file is damaged)", file=path)
        if not all_ok:
            raise BadInput(f"{damaged}: its header and data do not match CHECKSUM (the file is damaged)", file=path)
        return
    info = hdu.fileinfo()
    data_sum = _ones_complement_sum(path, info["datLoc"], info["datLoc"] + info["datSpan"])
    if "DATASUM" in header:
        try:
            expected = int(str(header["DATASUM"]).strip())
        except ValueError:
            raise BadInput(f"{damaged}: its DATASUM card {header['DATASUM']!r} is not a number", file=path) from None
        if data_sum != expected:
            raise BadInput(f"{damaged}: its data sums to {data_sum}, DATASUM says {expected} "
                           "(the file is damaged: the data changed after it was written)", file=path)
    if "CHECKSUM" in header:
        total = _ones_complement_sum(path, info["hdrLoc"], info["datLoc"]) + data_sum
        while total >> 32:
            total = (total & 0xFFFFFFFF) + (total >> 32)
        if total != 0xFFFFFFFF:  # the ones' complement sum of a whole HDU with a valid CHECKSUM is -0
            raise BadInput(f"{damaged}: its header and data do not match CHECKSUM "
                           "(the file is damaged: the HDU changed after it was written)", file=path)


def _hdu(hdul: fits.HDUList, name: str, path: Path, required: bool = True) -> fits.hdu.base.ExtensionHDU | None:
    try:
        return hdul[name]
    except KeyError:
        if required:
            raise BadInput(f"missing HDU {name}", file=path) from None
        return None


def _native(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder not in ("=", "|") else a


def _strings(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "S":
        a = np.char.decode(a, "ascii", errors="replace")
    return np.char.strip(a.astype(str)).astype(object)


def _column(table: fits.FITS_rec, name: str, n: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, valid) of a table column; a missing column is all-invalid."""
    names = {c.upper(): c for c in table.columns.names}
    if name.upper() not in names:
        fill = np.full(n, None, dtype=object) if dtype == "str" else np.zeros(n, dtype=dtype)
        return fill, np.zeros(n, dtype=bool)
    raw = table[names[name.upper()]]
    if dtype == "str":
        return _strings(raw), np.ones(n, dtype=bool)
    values = _native(raw).astype(dtype)
    valid = np.isfinite(values) if values.dtype.kind == "f" else np.ones(n, dtype=bool)
    return values, valid


def _target_bits(fibermap: fits.FITS_rec, survey: str, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The survey's own targeting bitmask columns (SV3_DESI_TARGET for sv3, ...) under main-survey names."""
    names = {c.upper() for c in fibermap.columns.names}
    prefix = _SURVEY_PREFIX.get(survey, "")
    out = {}
    for col in TARGET_BIT_COLUMNS:
        candidates = [prefix + col, col] + [p + col for p in ("SV3_", "SV2_", "SV1_")]
        if col == "DESI_TARGET":
            candidates.append("CMX_TARGET")
        chosen = next((c for c in candidates if c in names), None)
        out[col] = _column(fibermap, chosen or col, n, "int64")
    return out


# ---------------------------------------------------------------- scan
@dataclass
class Scan:
    """Per-spectrum metadata of one coadd/redrock pair (no flux)."""

    group: SourceGroup
    survey: str
    program: str
    columns: dict[str, tuple[np.ndarray, np.ndarray]]
    """name -> (values, valid); row i is coadd row ``columns['ROW'][0][i]``."""

    def __len__(self) -> int:
        return len(self.columns["TARGETID"][0])


def is_healpix_coadd(path: str | Path) -> bool:
    """A healpix coadd (``coadd-<survey>-<program>-<pixel>.fits``): one spectrum per target per survey and program,
    unlike tile coadds (``coadd-<petal>-<tile>-thru<night>``), where a target observed on several tiles recurs."""
    m = _NAME_RE.match(Path(path).name)
    return bool(m) and _HEALPIX_KEY_RE.match(m.group(2)) is not None


def _survey_program(header: fits.Header, fibermap: fits.FITS_rec, key: str) -> tuple[str, str]:
    survey = str(header.get("SURVEY", "") or "").strip().lower()
    program = str(header.get("PROGRAM", "") or header.get("FAPRGRM", "") or "").strip().lower()
    m = _HEALPIX_KEY_RE.match(key)
    if m:
        survey, program = survey or m.group("survey"), program or m.group("program")
    names = {c.upper() for c in fibermap.columns.names}
    if not survey and "SURVEY" in names and len(fibermap):
        survey = str(_strings(fibermap["SURVEY"][:1])[0]).lower()
    if not program and "PROGRAM" in names and len(fibermap):
        program = str(_strings(fibermap["PROGRAM"][:1])[0]).lower()
    return survey or "unknown", program or "unknown"


def fibermap_targetids(coadd: Path | str) -> np.ndarray | None:
    """The TARGETIDs a coadd's FIBERMAP lists, or None when even that cannot be read (for naming left-out targets)."""
    try:
        with fits.open(coadd, memmap=False) as hdul:
            return _native(hdul["FIBERMAP"].data["TARGETID"]).astype(np.int64)
    except Exception:  # noqa: BLE001 - a damaged file may fail in any way; then nobody can be named
        return None


def arms_present(hdul: fits.HDUList) -> list[str]:
    """Arms (B, R, Z) whose FLUX HDU is in the file."""
    names = {h.name.upper() for h in hdul}
    return [arm for arm in ARMS if f"{arm}_FLUX" in names]


def _check_repeated_redshifts(ztid: np.ndarray, tid: np.ndarray, path: Path) -> None:
    """A TargetID on more REDSHIFTS rows than FIBERMAP rows leaves its redshift a guess: the file is refused.

    A coadd holding a target twice has its redrock rows twice (matched in file order; the first is kept)."""
    zu, zc = np.unique(ztid, return_counts=True)
    if not (zc > 1).any():
        return
    in_coadd = dict(zip(*(a.tolist() for a in np.unique(tid, return_counts=True))))
    extra = [t for t, c in zip(zu.tolist(), zc.tolist()) if c > in_coadd.get(t, 0)]
    if extra:
        raise BadInput(f"REDSHIFTS lists {targetid_list(extra)} on more rows than the coadd's FIBERMAP: which row "
                       "is the target's redshift cannot be told", file=path)


def scan_group(group: SourceGroup) -> tuple[Scan, list[Problem]]:
    """Read and check the metadata of one pair; raise BadInput for a file-level problem."""
    problems: list[Problem] = []
    coadd_path, rr_path = Path(group.coadd), Path(group.redrock)
    with open_checked(coadd_path) as hdul:
        _hdu(hdul, "FIBERMAP", coadd_path)
        for name in (0, "FIBERMAP"):  # the HDUs the scan reads (the flux HDUs are checked by read_arms)
            verify_checksum(hdul, name, coadd_path)
        fibermap = hdul["FIBERMAP"].data
        if fibermap is None or len(fibermap) == 0:
            raise BadInput("FIBERMAP HDU is empty", file=coadd_path)
        if "TARGETID" not in [c.upper() for c in fibermap.columns.names]:
            raise BadInput("FIBERMAP HDU has no TARGETID column", file=coadd_path)
        n = len(fibermap)
        arms = arms_present(hdul)
        names = {h.name.upper() for h in hdul}
        for arm in ARMS:  # an arm whose other HDUs are here but whose flux is not: a damaged file, not a 2-arm one
            orphans = [f"{arm}_{part}" for part in ("WAVELENGTH", "IVAR", "MASK") if f"{arm}_{part}" in names]
            if arm not in arms and orphans:
                raise BadInput(f"missing HDU {arm}_FLUX while {', '.join(orphans)} are present", file=coadd_path)
        if not arms:
            raise BadInput("missing HDUs B_FLUX, R_FLUX and Z_FLUX (no spectra)", file=coadd_path)
        for arm in arms:
            for part in ("WAVELENGTH", "IVAR"):
                _hdu(hdul, f"{arm}_{part}", coadd_path)
            npix = {}
            for part in ("FLUX", "IVAR", "MASK", "RESOLUTION"):
                h = _hdu(hdul, f"{arm}_{part}", coadd_path, required=False)
                want = 3 if part == "RESOLUTION" else 2  # (spectra, [diagonals,] pixels)
                if h is not None and h.header.get("NAXIS", 0) != want:
                    raise BadInput(f"{arm}_{part} has {h.header.get('NAXIS', 0)} axes, not {want} (spectra x pixels"
                                   + (" x diagonals" if want == 3 else "") + ")", file=coadd_path)
                if h is not None and h.header.get("NAXIS", 0) >= 2 and h.shape[0] != n:
                    raise BadInput(
                        f"FIBERMAP has {n} rows but {arm}_{part} has {h.shape[0]}: the rows of the file disagree",
                        file=coadd_path,
                    )
                if h is not None and part != "RESOLUTION" and h.header.get("NAXIS", 0) >= 2:
                    npix[part] = h.shape[-1]
            if len(set(npix.values())) > 1:
                raise BadInput(f"arm {arm}: pixel counts differ between HDUs ("
                               + ", ".join(f"{arm}_{k} {v}" for k, v in npix.items()) + ")", file=coadd_path)
        survey, program = _survey_program(hdul[0].header, fibermap, group.key)
        tid = _native(fibermap["TARGETID"]).astype(np.int64)
        cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        ones = np.ones(n, dtype=bool)
        cols["TARGETID"] = (tid, ones)
        cols["ROW"] = (np.arange(n, dtype=np.int64), ones)
        ra, ra_ok = _column(fibermap, "TARGET_RA", n, "float64")
        dec, dec_ok = _column(fibermap, "TARGET_DEC", n, "float64")
        cols["RA"], cols["DEC"] = (ra, ra_ok), (dec, dec_ok)
        for name in FIBERMAP_FLOAT_COLUMNS:
            cols[name] = _column(fibermap, name, n, "float32")
        cols.update(_target_bits(fibermap, survey, n))
        cols["COADD_FIBERSTATUS"] = _column(fibermap, "COADD_FIBERSTATUS", n, "int64")
        cols["OBJTYPE"] = _column(fibermap, "OBJTYPE", n, "str")
    with open_checked(rr_path) as rr:
        _hdu(rr, "REDSHIFTS", rr_path)
        for name in (0, "REDSHIFTS", "TSNR2"):
            if name in rr:
                verify_checksum(rr, name, rr_path)
        zt = rr["REDSHIFTS"].data
        if zt is None or "TARGETID" not in [c.upper() for c in zt.columns.names]:
            raise BadInput("REDSHIFTS HDU has no TARGETID column", file=rr_path)
        ztid = _native(zt["TARGETID"]).astype(np.int64)
        if len(ztid) == 0:
            raise BadInput("REDSHIFTS HDU has no rows", file=rr_path)
        _check_repeated_redshifts(ztid, tid, rr_path)
        tsnr = _hdu(rr, "TSNR2", rr_path, required=False)
        tsnr = tsnr.data if tsnr is not None else None
        if tsnr is not None and (len(tsnr) != len(zt) or not np.array_equal(_native(tsnr["TARGETID"]), ztid)):
            raise BadInput("TSNR2 rows do not match REDSHIFTS row for row", file=rr_path)
        zcols = {name: _column(zt, name, len(zt), "float64") for name in REDSHIFT_FLOAT_COLUMNS}
        zcols["ZWARN"] = _column(zt, "ZWARN", len(zt), "int64")
        for name in REDSHIFT_STRING_COLUMNS:
            zcols[name] = _column(zt, name, len(zt), "str")
        for name in TSNR2_COLUMNS:
            zcols[name] = _column(tsnr, name, len(zt), "float32") if tsnr is not None else (
                np.zeros(len(zt), np.float32), np.zeros(len(zt), bool))
    # Match redrock rows to coadd rows by TARGETID (DESI writes them in the same order, but do not rely on it).
    order = np.argsort(ztid, kind="stable")
    pos = np.clip(np.searchsorted(ztid, tid, sorter=order), 0, max(len(ztid) - 1, 0))
    zrow = order[pos] if len(ztid) else np.zeros(n, dtype=np.int64)
    matched = (ztid[zrow] == tid) if len(ztid) else np.zeros(n, dtype=bool)
    for name, (values, valid) in zcols.items():
        cols[name] = (values[zrow] if len(ztid) else values[:0].repeat(0), valid[zrow] & matched if len(ztid) else matched)
    keep = matched.copy()
    for t in tid[~matched]:
        problems.append(Problem("target has no row in the redrock file's REDSHIFTS; skipped", file=str(rr_path), target=int(t)))
    # The same target twice in one coadd: keep the first row.
    _, first = np.unique(tid, return_index=True)
    dup = np.ones(n, dtype=bool)
    dup[first] = False
    for i in np.flatnonzero(dup & keep):
        problems.append(Problem("duplicate TARGETID within one coadd file; the first row is kept", file=str(coadd_path),
                                target=int(tid[i]), severity="warning"))
    bad_pos = keep & ~(ra_ok & dec_ok & (np.abs(dec) <= 90))
    for i in np.flatnonzero(bad_pos):
        problems.append(Problem("TARGET_RA/TARGET_DEC missing or invalid; skipped", file=str(coadd_path), target=int(tid[i])))
    keep &= ~dup & ~bad_pos
    if "Z" in cols:  # kept (the layers flag such rows BAD_REDSHIFT), but a redrock file should never say this
        zv, zok = cols["Z"]
        with np.errstate(invalid="ignore"):
            odd = keep & ~(zok & np.isfinite(zv) & (zv > MIN_PLAUSIBLE_Z))
        for i in np.flatnonzero(odd):
            problems.append(Problem(f"redshift Z = {f'{zv[i]:g}' if zok[i] and np.isfinite(zv[i]) else 'NaN or missing'} is not a redshift (not finite or below "
                                    f"{MIN_PLAUSIBLE_Z}); kept, the layers flag it BAD_REDSHIFT", file=str(rr_path),
                                    target=int(tid[i]), severity="warning"))
    cols = {name: (v[keep], ok[keep]) for name, (v, ok) in cols.items()}
    cols["HEALPIX"] = (
        hp.ang2pix(DESI_NSIDE, cols["RA"][0], cols["DEC"][0], nest=True, lonlat=True).astype(np.int64),
        np.ones(int(keep.sum()), dtype=bool),
    )
    return Scan(group, survey, program, cols), problems


# ---------------------------------------------------------------- flux
@dataclass
class ArmData:
    """One arm of selected rows of a coadd."""

    index: slice
    """Where the arm's pixels sit on the brz grid."""
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    resolution_mean: np.ndarray | None
    """(ndiag, nwave) mean resolution data over the rows, or None when the file has none."""


def brz_index(wave: np.ndarray, path: Path, arm: str) -> slice:
    """Slice of the brz grid an arm's wavelengths occupy (BadInput if not on the grid)."""
    wave = np.asarray(wave, dtype=np.float64)
    i0 = int(round((wave[0] - grid.WAVE_MIN) / grid.DWAVE))
    expected = grid.WAVE_MIN + grid.DWAVE * (i0 + np.arange(len(wave)))
    if i0 < 0 or i0 + len(wave) > grid.NPIX or not np.allclose(wave, expected, atol=1e-3 * grid.DWAVE, rtol=0):
        raise BadInput(
            f"{arm}_WAVELENGTH ({wave[0]:.2f}-{wave[-1]:.2f} A, {len(wave)} px) is not on the DESI brz grid "
            f"({grid.WAVE_MIN}-{grid.WAVE_MAX} A in {grid.DWAVE} A steps)",
            file=path,
        )
    return slice(i0, i0 + len(wave))


_BITPIX_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def image_rows(hdu: fits.ImageHDU, path: Path, rows: np.ndarray) -> np.ndarray:
    """Selected rows of an image HDU, memory-mapped, with BZERO/BSCALE applied.

    DESI writes the uint32 MASK images as int32 with BZERO = 2**31, which
    astropy refuses to memory-map; reading whole files instead would cost the
    ingest its bounded memory, so the rows are mapped here and scaled by hand.
    """
    header = hdu.header
    bzero, bscale = header.get("BZERO", 0), header.get("BSCALE", 1)
    if (bzero == 0 and bscale == 1 and "BLANK" not in header) or is_gzip(path):
        return _native(hdu.data[rows])  # astropy scales what it reads; a gzip file cannot be mapped anyway
    naxis = int(header["NAXIS"])
    shape = tuple(int(header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
    raw = np.memmap(path, dtype=_BITPIX_DTYPE[int(header["BITPIX"])], mode="r",
                    offset=hdu.fileinfo()["datLoc"], shape=shape)[rows]
    if int(header["BITPIX"]) > 0 and float(bscale) == 1 and float(bzero).is_integer():
        return raw.astype(np.int64) + int(bzero)  # exact for the unsigned-integer convention
    return raw.astype(np.float64) * float(bscale) + float(bzero)


def read_arms(path: Path | str, rows: np.ndarray) -> dict[str, ArmData]:
    """Flux, ivar, mask (and mean resolution) of ``rows`` of a coadd, per arm present."""
    path = Path(path)
    rows = np.asarray(rows, dtype=np.int64)
    out = {}
    with open_checked(path) as hdul:
        names = {h.name.upper() for h in hdul}
        for arm in arms_present(hdul):
            for part in ("WAVELENGTH", "FLUX", "IVAR", "MASK", "RESOLUTION"):
                if f"{arm}_{part}" in names:  # before any data is read: a damaged HDU is never ingested
                    verify_checksum(hdul, f"{arm}_{part}", path)
            try:
                index = brz_index(hdul[f"{arm}_WAVELENGTH"].data, path, arm)
                flux = _native(hdul[f"{arm}_FLUX"].data[rows]).astype(np.float32)
                ivar = _native(hdul[f"{arm}_IVAR"].data[rows]).astype(np.float32)
                mask = (
                    image_rows(hdul[f"{arm}_MASK"], path, rows).astype(np.uint32)
                    if f"{arm}_MASK" in names else np.zeros(flux.shape, dtype=np.uint32)
                )
                res = None
                if f"{arm}_RESOLUTION" in names and len(rows):
                    res = _native(hdul[f"{arm}_RESOLUTION"].data[rows]).astype(np.float64).mean(axis=0)
            except BadInput:
                raise
            except Exception as exc:  # memory-mapped reads of a damaged file fail in many ways
                raise BadInput(f"cannot read arm {arm} ({type(exc).__name__}: {exc})", file=path) from exc
            if flux.shape != (len(rows), index.stop - index.start):
                raise BadInput(f"{arm}_FLUX has {flux.shape[-1]} pixels but {arm}_WAVELENGTH has {index.stop - index.start}", file=path)
            out[arm] = ArmData(index, flux, ivar, mask, res)
    return out
