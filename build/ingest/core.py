"""The ingest: DESI files -> core table (HATS Parquet) + spectra store (HDF5).

Two passes, each a map that the orchestrator can run on Dask:

1. :func:`scan_source` (one task per coadd/redrock pair, :func:`scan_one`):
   metadata only; then :func:`make_plan` picks each target's primary
   spectrum, the partition order and the partition of every target.
2. :func:`ingest_partition` (one task per partition): reads the primary
   spectra's flux from their coadds, combines the arms on the brz grid and
   writes ``spectra/...h5`` and ``staging/core/...parquet`` (atomically).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ard_sql import contract, grid, paths, spectra_store
from ard_sql.build import hats_writer
from ard_sql.build.ingest import combine, desi_io, targets
from ard_sql.build.report import MAX_LISTED_TARGETS, BadInput, Problem, targetid_list
from ard_sql.regions import angular_separation_deg

#: Bump when the ingest's output changes for the same input (invalidates finished partitions).
INGEST_VERSION = "1"

#: Row count :func:`ingest_partition` returns when it kept the partition already on disk unwritten.
KEPT = -1


def _arrow(values: np.ndarray, valid: np.ndarray, type_: pa.DataType) -> pa.Array:
    if type_ == pa.string():
        return pa.array([v if ok else None for v, ok in zip(values, valid)], type_)
    return pa.array(values, type=type_, mask=~np.asarray(valid, dtype=bool))


def scan_one(group: desi_io.SourceGroup, rank: int, source: str) -> tuple[pa.Table | None, list[Problem]]:
    """Scan one pair: a table of its spectra (with SOURCE_RANK, SURVEY, PROGRAM), or None and the problem."""
    try:
        scan, problems = desi_io.scan_group(group)
    except BadInput as exc:
        problem = exc.problem()
        listed = desi_io.fibermap_targetids(group.coadd)  # who is missing, when the file says it
        if listed is not None and len(listed):
            problem.reason += (f"; none of the {len(listed)} target(s) it lists is ingested from it now (rows built from "
                               f"it before are kept): {targetid_list(listed)}")
        return None, [problem]
    n = len(scan)
    cols: dict[str, pa.Array] = {}
    for name, (values, valid) in scan.columns.items():
        kind = np.asarray(values).dtype.kind
        type_ = pa.string() if kind in "OUS" else pa.from_numpy_dtype(np.asarray(values).dtype)
        cols[name] = _arrow(values, valid, type_)
    cols["SURVEY"] = pa.array([scan.survey] * n, pa.string())
    cols["PROGRAM"] = pa.array([scan.program] * n, pa.string())
    cols["SOURCE_RANK"] = pa.array(np.full(n, rank, dtype=np.int32))
    return pa.table(cols), problems


@dataclass
class Plan:
    """What the partition pass needs: the primary spectra, their partitions and source files."""

    source: str
    order: int
    files: list[tuple[str, str]]
    """(coadd, redrock) per SOURCE_RANK, absolute paths."""
    rows: pa.Table
    """Primary spectra: scan columns + PIXEL + N_SPECTRA + TARGET_CLASS."""
    problems: list[Problem] = field(default_factory=list)
    conflicted: set[str] = field(default_factory=set)
    """Coadds that share a TargetID they should not (both files of each problem of :func:`repeated_target_problems`)."""

    def pixels(self) -> list[int]:
        """Partition pixels with at least one target, sorted."""
        return sorted(set(self.rows.column("PIXEL").to_pylist()))

    def partition(self, pixel: int) -> "PartitionInput":
        """Everything one partition task needs (picklable)."""
        mask = np.asarray(self.rows.column("PIXEL").to_numpy() == pixel)
        rows = self.rows.filter(pa.array(mask))
        ranks = sorted(set(rows.column("SOURCE_RANK").to_pylist()))
        files = {r: self.files[r] for r in ranks}
        return PartitionInput(self.source, self.order, int(pixel), rows, files)


@dataclass
class PartitionInput:
    """Input of one ingest partition task."""

    source: str
    order: int
    pixel: int
    rows: pa.Table
    files: dict[int, tuple[str, str]]

    def fingerprint(self) -> str:
        """Hash of everything the output depends on: version, order, targets, source files' size and mtime."""
        h = hashlib.sha256()
        h.update(f"{INGEST_VERSION}|{self.order}|{self.pixel}|".encode())
        for col in ("TARGETID", "ROW", "N_SPECTRA"):
            h.update(np.ascontiguousarray(self.rows.column(col).to_numpy()).tobytes())
        # each row's file by path, not by its rank in the whole source: adding or removing a file elsewhere in the
        # survey shifts every rank after it, and must not make unchanged partitions look changed
        h.update("|".join(self.files[r][0] for r in self.rows.column("SOURCE_RANK").to_pylist()).encode())
        for f in sorted(f for pair in self.files.values() for f in pair):
            st = Path(f).stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|".encode())
        return h.hexdigest()


def make_plan(
    source: str | Path,
    groups: list[desi_io.SourceGroup],
    scans: list[pa.Table | None],
    *,
    order: int | None = None,
    zcat: dict[int, tuple[str, str]] | None = None,
    max_rows: int = targets.DEFAULT_MAX_ROWS,
) -> Plan:
    """Pick primary spectra, the partition order and every target's partition."""
    tables = [t for t in scans if t is not None and t.num_rows]
    files = [(str(g.coadd), str(g.redrock)) for g in groups]
    if not tables:
        return Plan(str(source), order if order is not None else 0, files, pa.table({"PIXEL": pa.array([], pa.int64())}))
    allrows = pa.concat_tables(tables, promote_options="permissive")
    tid = allrows.column("TARGETID").to_numpy()
    zwarn = allrows.column("ZWARN").fill_null(1 << 30).to_numpy()
    tsnr = allrows.column("TSNR2_LRG").cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    survey = np.asarray(allrows.column("SURVEY").to_pylist(), dtype=object)
    program = np.asarray(allrows.column("PROGRAM").to_pylist(), dtype=object)
    rank = allrows.column("SOURCE_RANK").to_numpy()
    primary, nspec = targets.primary_flags(tid, zwarn, tsnr, survey, program, rank, zcat)
    problems, conflicted = repeated_target_problems(allrows, primary, files)
    rows = allrows.append_column("N_SPECTRA", pa.array(nspec.astype(np.int16))).filter(pa.array(primary))
    hpx = rows.column("HEALPIX").to_numpy()
    k = targets.choose_order(hpx, max_rows) if order is None else int(order)
    rows = rows.append_column("PIXEL", pa.array(targets.partition_pixel(hpx, k)))
    cls = targets.target_class(
        rows.column("DESI_TARGET").fill_null(0).to_numpy(),
        rows.column("BGS_TARGET").fill_null(0).to_numpy(),
        rows.column("MWS_TARGET").fill_null(0).to_numpy(),
        np.asarray(rows.column("SURVEY").to_pylist(), dtype=object),
    )
    rows = rows.append_column("TARGET_CLASS", pa.array(list(cls), pa.string()))
    return Plan(str(source), k, files, rows, problems, conflicted)


#: Two spectra of one TargetID farther apart on the sky than this are two different objects.
SAME_OBJECT_ARCSEC = 1.0


def repeated_target_problems(rows: pa.Table, primary: np.ndarray, files: list[tuple[str, str]]
                             ) -> tuple[list[Problem], set[str]]:
    """Problems for TargetIDs whose several spectra cannot be one object observed more than once, and the coadds involved.

    DESI's healpix coadds hold a target once per survey and program, always at
    the same position: a TargetID twice in one (SURVEY, PROGRAM) of healpix
    coadds means a copied or mislabelled file (tile coadds repeat a target
    observed on several tiles: a repeat there is normal), and spectra more than ``SAME_OBJECT_ARCSEC`` apart are two
    objects under one ID. The primary spectrum is kept, as for any repeat; the
    problem names both files so the user can decide.
    """
    tid = rows.column("TARGETID").to_numpy()
    order = np.argsort(tid, kind="stable")
    t = tid[order]
    repeated = np.flatnonzero(np.r_[t[1:] == t[:-1], False] | np.r_[False, t[1:] == t[:-1]])
    if repeated.size == 0:
        return [], set()
    ra = rows.column("RA").cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    dec = rows.column("DEC").cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    survey = np.asarray(rows.column("SURVEY").to_pylist(), dtype=object)
    program = np.asarray(rows.column("PROGRAM").to_pylist(), dtype=object)
    rank = rows.column("SOURCE_RANK").to_numpy()
    out, conflicted = [], set()
    idx = order[repeated]
    for target in np.unique(tid[idx]):
        mine = idx[tid[idx] == target]
        keep = mine[primary[mine]][0] if primary[mine].any() else mine[0]
        for other in mine[mine != keep]:
            sep = float(angular_separation_deg(ra[keep], dec[keep], ra[other], dec[other])) * 3600.0
            why = []
            same_program = survey[other] == survey[keep] and program[other] == program[keep]
            # only healpix coadds promise one spectrum per survey and program; tiles repeat targets by design
            both_healpix = desi_io.is_healpix_coadd(files[rank[keep]][0]) and desi_io.is_healpix_coadd(files[rank[other]][0])
            if same_program and both_healpix:
                why.append(f"twice in survey {survey[keep]}, program {program[keep]} (a copied or mislabelled file?)")
            if not sep <= SAME_OBJECT_ARCSEC:
                why.append(f"at positions {sep / 3600:.4g} deg apart (two different objects under one TargetID?)")
            if why:
                out.append(Problem(f"TargetID also in {files[rank[keep]][0]}: " + " and ".join(why)
                                   + "; that file's spectrum is kept as the target's, this one is only counted in N_SPECTRA",
                                   file=files[rank[other]][0], target=int(target)))
                conflicted |= {files[rank[keep]][0], files[rank[other]][0]}
    return out, conflicted


def _relative(path: str, source: str) -> str:
    try:
        return Path(path).resolve().relative_to(Path(source).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def ingest_partition(ard_dir: str | Path, part: PartitionInput) -> tuple[int, list[Problem]]:
    """Read, combine and write one partition (spectra file, then core file); return (rows, problems).

    A coadd whose flux cannot be read (or fails its checksums) is reported.
    On a first build its targets are left out, named in the report entry
    (:func:`left_out_text`), and the rest of the partition is written; on a
    rebuild (the partition's core file exists) nothing is written and
    :data:`KEPT` is returned, so the finished partition keeps every row.
    """
    problems: list[Problem] = []
    rows = part.rows
    rank = rows.column("SOURCE_RANK").to_numpy()
    coadd_row = rows.column("ROW").to_numpy()
    n = rows.num_rows
    flux = np.zeros((n, grid.NPIX), np.float32)
    ivar = np.zeros((n, grid.NPIX), np.float32)
    mask = np.zeros((n, grid.NPIX), np.uint32)
    snr = {arm: np.full(n, np.nan, np.float32) for arm in desi_io.ARMS}
    ok = np.ones(n, dtype=bool)
    res_acc: dict[str, list] = {}
    unread: list[tuple[Problem, np.ndarray]] = []
    for r in sorted(part.files):
        sel = np.flatnonzero(rank == r)
        coadd = part.files[r][0]
        try:
            arms = desi_io.read_arms(coadd, coadd_row[sel])
        except BadInput as exc:
            problems.append(exc.problem())
            unread.append((problems[-1], sel))
            ok[sel] = False
            continue
        comb = combine.combine_arms({a: (d.index, d.flux, d.ivar, d.mask) for a, d in arms.items()}, len(sel))
        flux[sel], ivar[sel], mask[sel] = comb.flux, comb.ivar, comb.mask
        for arm, values in comb.snr_arm.items():
            snr[arm][sel] = values
        for i in np.flatnonzero(comb.n_repaired):
            problems.append(Problem(
                f"{int(comb.n_repaired[i])} pixels with NaN/inf flux or ivar, or negative ivar, were masked (ivar 0)",
                file=coadd, target=int(rows.column("TARGETID")[int(sel[i])].as_py()), severity="warning",
            ))
        for arm, d in arms.items():
            res_acc.setdefault(arm, []).append((d.index, d.resolution_mean, len(sel)))
    per_arm = {}
    for arm, items in res_acc.items():
        with_res = [(idx, res, w) for idx, res, w in items if res is not None]
        if with_res:
            wsum = sum(w for _, _, w in with_res)
            per_arm[arm] = (with_res[0][0], sum(res * w for _, res, w in with_res) / wsum, wsum)
    lsf = combine.lsf_sigma(per_arm)
    for p in problems:
        p.pixel, p.order = part.pixel, part.order
    # A rebuild that cannot read one of its coadds would drop that file's finished rows:
    # keep the previous core file and spectra store untouched instead.
    if unread and paths.partition_file(ard_dir, part.order, part.pixel).exists():
        for p, _ in unread:
            p.reason += "; the partition was kept as previously built"
        return KEPT, problems
    all_tid = rows.column("TARGETID").to_numpy()
    for p, sel in unread:  # a first build: name what the skipped file cost
        p.reason += "; " + left_out_text(all_tid[sel])

    keep = np.flatnonzero(ok)
    rows, flux, ivar, mask = rows.take(pa.array(keep)), flux[keep], ivar[keep], mask[keep]
    snr = {arm: v[keep] for arm, v in snr.items()}
    ra, dec = rows.column("RA").to_numpy(), rows.column("DEC").to_numpy()
    order_idx = np.argsort(hats_writer.healpix29(ra, dec), kind="stable")  # core rows sorted by _healpix_29
    rows, flux, ivar, mask = rows.take(pa.array(order_idx)), flux[order_idx], ivar[order_idx], mask[order_idx]
    snr = {arm: v[order_idx] for arm, v in snr.items()}
    snr_median = combine.median_snr(flux, ivar, mask)

    tid = rows.column("TARGETID").to_numpy()
    spectra_store.write_partition(ard_dir, part.order, part.pixel, tid, flux, ivar, mask, lsf)
    core = _core_table(rows, part, snr, snr_median)
    table = hats_writer.with_positions(hats_writer.conform_table(core, paths.CORE, f"core pixel {part.pixel}"), paths.CORE, ra[order_idx], dec[order_idx])
    hats_writer.write_partition(ard_dir, paths.CORE, part.order, part.pixel, table)
    return table.num_rows, problems


def left_out_text(targetids: np.ndarray) -> str:
    """'its N target(s) of this partition are left out of the ARD: TargetID a, b, ...'."""
    return f"its {len(targetids)} target(s) of this partition are left out of the ARD: {targetid_list(targetids)}"


def _core_table(rows: pa.Table, part: PartitionInput, snr: dict[str, np.ndarray], snr_median: np.ndarray) -> pa.Table:
    n = rows.num_rows
    files = rows.column("SOURCE_RANK").to_numpy()

    def col(name: str) -> pa.ChunkedArray | pa.Array:
        return rows.column(name)

    def nan_null(values: np.ndarray) -> pa.Array:
        return pa.array(values, mask=~np.isfinite(values))

    out: dict[str, pa.Array | pa.ChunkedArray] = {
        "TargetID": col("TARGETID"),
        "RA": col("RA"),
        "DEC": col("DEC"),
        "Z": col("Z"), "ZERR": col("ZERR"), "ZWARN": col("ZWARN"), "CHI2": col("CHI2"), "DELTACHI2": col("DELTACHI2"),
        "SPECTYPE": col("SPECTYPE"), "SUBTYPE": col("SUBTYPE"),
        "SURVEY": col("SURVEY"), "PROGRAM": col("PROGRAM"),
        "HEALPIX": col("HEALPIX"),
    }
    for name in desi_io.FIBERMAP_FLOAT_COLUMNS + desi_io.TARGET_BIT_COLUMNS:
        out[name] = col(name)
    out["TARGET_CLASS"] = col("TARGET_CLASS")
    out["SNR_Median"] = nan_null(snr_median)
    for arm in desi_io.ARMS:
        out[f"SNR_{arm}"] = nan_null(snr[arm])
    for name in desi_io.TSNR2_COLUMNS:
        out[name] = col(name)
    out["N_SPECTRA"] = col("N_SPECTRA")
    out["SPEC_FILE"] = pa.array([paths.spectra_relpath(part.order, part.pixel)] * n, pa.string())
    out["SPEC_ROW"] = pa.array(np.arange(n, dtype=np.int32))
    out["SOURCE_FILE"] = pa.array([_relative(part.files[int(r)][0], part.source) for r in files], pa.string())
    missing = [c.name for c in contract.CORE_COLUMNS if c.name not in out]
    if missing:  # pragma: no cover - guards the contract staying in step with the ingest
        raise RuntimeError(f"ingest does not produce core column(s) {missing}")
    return pa.table(out)


def partitions_using(ard_dir: str | Path, source: str | Path, coadds: set[str],
                     planned: dict[tuple[int, int], np.ndarray]) -> set[tuple[int, int]]:
    """(order, pixel) of the finished core partitions holding rows ingested from any of ``coadds`` and a TargetID
    that ``planned`` (this plan's TargetIDs per partition) does not give them.

    A rebuild must not rewrite these while one of those files cannot be read:
    the partition would lose that file's rows (a failed rebuild never damages
    a finished ARD). One that holds every target the plan gives it loses
    nothing: a target left out at its first build (a bad RA/Dec, a file
    unreadable then) is no reason to freeze it for good.
    """
    if not coadds:
        return set()
    # SOURCE_FILE is relative to the source folder of the build that wrote the partition, which may have been a
    # parent or a child of this one: a file matches when one relative path is the tail of the other
    wanted = {Path(_relative(c, str(source))).parts for c in coadds}
    out = set()
    import pyarrow.parquet as pq

    for order, pixel, f in hats_writer.partition_files(ard_dir, paths.CORE):
        try:
            t = pq.read_table(f, columns=["SOURCE_FILE", "TargetID"])
        except Exception:  # noqa: BLE001 - an unreadable old partition is simply rebuilt
            continue
        used = set(t.column("SOURCE_FILE").to_pylist())
        if (any(_same_tail(Path(u).parts, w) for u in used if u for w in wanted)
                and not np.isin(t.column("TargetID").to_numpy(), planned.get((order, pixel), [])).all()):
            out.add((order, pixel))
    return out


def _same_tail(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether the shorter of two relative paths (as parts) is the tail of the longer."""
    n = min(len(a), len(b))
    return n > 0 and a[-n:] == b[-n:]


def plan_summary(plan: Plan) -> dict:
    """Small JSON-able summary of a plan (for the build report)."""
    return {
        "source": plan.source,
        "order": plan.order,
        "files": len(plan.files),
        "targets": plan.rows.num_rows,
        "partitions": len(plan.pixels()),
    }


def zcatalog(path: str | Path | None) -> dict[int, tuple[str, str]] | None:
    """Read a zpix catalog's primary (SURVEY, PROGRAM) per target, or None."""
    return targets.read_zcatalog(path) if path else None


__all__ = ["INGEST_VERSION", "KEPT", "MAX_LISTED_TARGETS", "left_out_text", "Plan", "PartitionInput", "scan_one", "make_plan", "ingest_partition", "partitions_using",
           "plan_summary", "zcatalog"]
