"""Benchmark: ``spectrum(targetid)`` from the ARD's HDF5 store vs reading the coadd FITS with astropy.

One process, same targets, same machine:

* warm single-target latency (p50, p90) of ``SELECT spectrum(?)`` through
  ``ard_sql.open()`` (DuckDB -> Arrow UDF -> h5py chunk read), against
  astropy: open the target's coadd, find its FIBERMAP row,
  read the B/R/Z FLUX/IVAR/MASK rows with ``ImageHDU.section`` (no arm combination: astropy gets the
  easier job);
* 1000 random targets in one query (Arrow result), against astropy reading
  the same 1000 spectra file by file (each coadd opened once).

The ratio is astropy time / ARD time (> 1: the ARD is faster). Goals in
issue 2: p50 < 5 ms warm, 1000 targets < 1 s.

Usage::

    python3 bench/bench_spectrum.py --mock /tmp/mock3k --queries 300 --batch 1000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def astropy_read(coadd: Path, targetids: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """The B/R/Z flux, ivar, mask rows of ``targetids`` from one coadd file (astropy)."""
    from astropy.io import fits

    out = []
    with fits.open(coadd, memmap=False) as h:
        tid = np.asarray(h["FIBERMAP"].data["TARGETID"])
        rows = [int(np.flatnonzero(tid == t)[0]) for t in targetids]
        names = [f"{a}_{k}" for a in "BRZ" for k in ("FLUX", "IVAR", "MASK")]
        for r in rows:  # .section reads only the row (and applies BZERO to the uint32 masks)
            out.append(tuple(np.asarray(h[name].section[r]) for name in names))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="targets in the mock survey (when it is made here)")
    ap.add_argument("--mock", type=Path, default=None, help="mock survey folder (made when absent)")
    ap.add_argument("--ard", type=Path, default=None, help="ARD folder (built from the mock when absent)")
    ap.add_argument("--queries", type=int, default=300, help="single-target queries timed")
    ap.add_argument("--batch", type=int, default=1000, help="targets in the batch query")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    import ard_sql
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    work = Path(tempfile.mkdtemp(prefix="bench_spectrum_"))
    mock = args.mock or work / "mock"
    if not (mock / "healpix").exists():
        from ard_sql.build.mock.survey import MockConfig, run_mock

        run_mock(MockConfig(out=mock, n=args.n, truth_spectra=False))
    ard = args.ard or work / "ard"
    if not (ard / "ard.duckdb").exists():
        report = build(BuildOptions(source=str(mock), out=str(ard), layers=[], scheduler="sync", progress=False))
        assert not report.errors, report.errors[:3]

    db = ard_sql.open(ard)
    rows = db.sql("SELECT TargetID, SOURCE_FILE FROM core").fetchall()
    tids = np.array([r[0] for r in rows], np.int64)
    source = {int(t): mock / f for t, f in rows}
    rng = np.random.default_rng(args.seed)
    print(f"ARD {ard}: {len(tids)} targets; mock {mock}")

    # Warm-up: loads the TargetID lookup and opens the files once.
    db.sql("SELECT count(spectrum(TargetID)) FROM core").fetchall()
    picks = rng.choice(tids, size=args.queries, replace=True)
    ard_t, arrow_t = [], []
    for t in picks:
        t0 = time.perf_counter()
        s = db.sql("SELECT spectrum(?::BIGINT) AS s", params=[int(t)]).fetchall()[0][0]
        ard_t.append(time.perf_counter() - t0)
        assert s is not None and len(s["flux"]) == 7781
        t0 = time.perf_counter()
        table = db.sql("SELECT spectrum(?::BIGINT) AS s", params=[int(t)]).to_arrow_table()
        arrow_t.append(time.perf_counter() - t0)
        assert table.column("s").null_count == 0
    fits_t = []
    for t in picks:
        t0 = time.perf_counter()
        astropy_read(source[int(t)], np.array([t]))
        fits_t.append(time.perf_counter() - t0)
    body = db.cache["spectrum"]  # the UDF's body: TargetID lookup + HDF5 chunk reads, no DuckDB
    store_t = []
    for t in picks:
        t0 = time.perf_counter()
        found = body.read(np.array([t], np.int64))[0]
        store_t.append(time.perf_counter() - t0)
        assert found[0]
    a50, a90 = np.percentile(ard_t, [50, 90]) * 1e3
    w50, w90 = np.percentile(arrow_t, [50, 90]) * 1e3
    s50 = np.percentile(store_t, 50) * 1e3
    f50, f90 = np.percentile(fits_t, [50, 90]) * 1e3
    print(f"single target, warm: ARD p50 {a50:.2f} ms (p90 {a90:.2f}) as Python lists (fetchall), "
          f"p50 {w50:.2f} ms (p90 {w90:.2f}) as Arrow; astropy FITS p50 {f50:.2f} ms (p90 {f90:.2f}); "
          f"ratio (astropy/ARD, p50, fetchall) {f50 / a50:.1f}x")
    print(f"  of which the store (UDF body: lookup + HDF5 read, no SQL) p50 {s50:.2f} ms: ratio astropy/store {f50 / s50:.1f}x; "
          f"the rest is DuckDB moving the Arrow STRUCT of 4 x 7781-element arrays in and out")

    batch = rng.choice(tids, size=min(args.batch, len(tids)), replace=False)
    best_ard = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        table = db.sql("SELECT t, spectrum(t) AS s FROM (SELECT unnest(?::BIGINT[]) AS t)",
                       params=[batch.tolist()]).arrow()
        table = table.read_all() if hasattr(table, "read_all") else table
        best_ard = min(best_ard, time.perf_counter() - t0)
        assert table.num_rows == len(batch) and table.column("s").null_count == 0
    best_store = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        found = body.read(batch)[0]
        best_store = min(best_store, time.perf_counter() - t0)
        assert found.all()
    best_fits = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        by_file: dict[Path, list[int]] = {}
        for t in batch:
            by_file.setdefault(source[int(t)], []).append(int(t))
        n = sum(len(astropy_read(f, np.array(ts))) for f, ts in by_file.items())
        best_fits = min(best_fits, time.perf_counter() - t0)
        assert n == len(batch)
    print(f"{len(batch)} random targets: ARD {best_ard:.3f} s (Arrow result); astropy FITS {best_fits:.3f} s "
          f"({len(by_file)} files); ratio (astropy/ARD) {best_fits / best_ard:.1f}x")
    print(f"  of which the store (UDF body, no SQL) {best_store:.3f} s: ratio astropy/store {best_fits / best_store:.1f}x")
    store = sum(f.stat().st_size for f in (ard / "spectra").rglob("*") if f.is_file())
    print(f"spectra store {store / 1e6:.0f} MB; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    db.close()


if __name__ == "__main__":
    main()
