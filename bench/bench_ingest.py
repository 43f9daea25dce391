"""Benchmark: ingest throughput (spectra per second per core) of ``ard build`` (core only).

Makes a mock survey in the DESI DR1 file format (``ard mock --no-truth-spectra``),
or reuses one, then times the ingest alone (``layers=[]``) in this process
(``scheduler='sync'``, one worker = one core), in wall time and in CPU time
(``time.process_time``, which a busy shared machine does not inflate). Throughput counts every spectrum
read from the coadds (primary and duplicates: the ingest scans all of them and
combines the arms of the primaries). The goal in issue 2 is >= 200 spectra/s/core.

Usage::

    python3 bench/bench_ingest.py --n 3000 --mock /tmp/mock3k --repeat 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def make_mock(out: Path, n: int, seed: int) -> None:
    from ard_sql.build.mock.survey import MockConfig, run_mock

    if (out / "healpix").exists():
        print(f"reusing the mock survey in {out}")
        return
    t = time.perf_counter()
    run_mock(MockConfig(out=out, n=n, seed=seed, truth_spectra=False))
    print(f"mock survey of {n} targets written to {out} in {time.perf_counter() - t:.1f} s")


def count_spectra(source: Path) -> tuple[int, int, int]:
    """(coadd files, spectra in them, bytes of the coadds)."""
    from astropy.io import fits

    files = sorted(source.rglob("coadd-*.fits"))
    n = sum(fits.getheader(f, "FIBERMAP")["NAXIS2"] for f in files)
    return len(files), n, sum(f.stat().st_size for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="targets in the mock survey")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mock", type=Path, default=None, help="mock survey folder (made when absent; default: temporary)")
    ap.add_argument("--repeat", type=int, default=2, help="timed builds (the best is reported)")
    args = ap.parse_args()

    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    mock = args.mock or work / "mock"
    make_mock(mock, args.n, args.seed)
    nfiles, nspec, nbytes = count_spectra(mock)
    print(f"source: {nfiles} coadd files, {nspec} spectra, {nbytes / 2**20:.0f} MiB")
    times, cpu = [], []
    for i in range(args.repeat):
        out = work / f"ard{i}"
        t, c = time.perf_counter(), time.process_time()
        report = build(BuildOptions(source=str(mock), out=str(out), layers=[], scheduler="sync", workers=1, progress=False))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        assert not report.errors, report.errors[:3]
        core = report.layers["core"]
        print(f"build {i}: {times[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU, {core['targets']} targets in {core['partitions']} partitions")
        shutil.rmtree(out)
    best = min(times)
    rate = nspec / best
    print(f"ingest (scheduler=sync, 1 core): {nspec} spectra in {best:.2f} s = {rate:.0f} spectra/s/core "
          f"(goal 200: ratio {rate / 200:.2f}x)")
    print(f"per CPU-second (all threads of this process; fair on a shared machine): {nspec / min(cpu):.0f} spectra/s "
          f"(goal 200: ratio {nspec / min(cpu) / 200:.2f}x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
