"""Fast mode vs reference pPXF on the same spectra, in one process.

    python bench/bench_ppxf.py                       # a fresh `ard mock --n 300` survey, 48 galaxies
    python bench/bench_ppxf.py --ard A --n 64        # galaxies of an existing ARD's first partition
    python bench/bench_ppxf.py --synthetic --n 48    # spectra made from the templates themselves

Both fitters get identical inputs and one thread (BLAS / torch) each. The fast fitter takes all
the spectra as one batch, as the build does, once before and once after the reference run (its
time is the mean), so that a change of load during the run affects both alike.
Prints CPU time (process_time) and wall time per spectrum, their ratios, and the agreement:
median |dsigma|/sigma, and median |dflux|/flux of every line at fast S/N > 10, plus how many
VelDisp each mode left NULL.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def _from_ard(ard: Path, n: int):
    import pyarrow.parquet as pq

    from ard_sql import paths, spectra_store

    files = sorted((paths.staging_dir(ard) / "dataset").rglob("Npix=*.parquet"))
    flux, ivar, mask, z = [], [], [], []
    for cf in files:
        core = pq.read_table(cf).to_pandas()
        core = core[(core.SPECTYPE == "GALAXY") & core.Z.notna()]
        order, pixel = int(cf.parent.parent.name.split("=")[1]), int(cf.stem.split("=")[1])
        s = spectra_store.read_partition(ard, order, pixel, core.TargetID.to_numpy())
        flux.append(s.flux), ivar.append(s.ivar), mask.append(s.mask), z.append(core.Z.to_numpy())
        if sum(len(a) for a in z) >= n:
            break
    cat = lambda a: np.concatenate(a)[:n]  # noqa: E731
    return s.wave, cat(flux), cat(ivar), cat(mask), s.lsf_sigma, cat(z)


def _mock(n: int, workdir: Path):
    from ard_sql.build.mock.survey import MockConfig, run_mock
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    run_mock(MockConfig(out=workdir / "m", n=300, seed=1, truth_spectra=False))
    build(BuildOptions(source=str(workdir / "m"), out=str(workdir / "a"), layers=[], scheduler="sync", progress=False))
    return _from_ard(workdir / "a", n)


def _synthetic(n: int, tpl: Path):
    from ard_sql.science.kinematics import synthetic_sample

    wave, flux, ivar, lsf, z, _ = synthetic_sample(tpl, n)
    return wave, flux, ivar, None, lsf, z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ard", type=Path, help="existing ARD (core ingested); default: a fresh small mock")
    ap.add_argument("--synthetic", action="store_true", help="template-made spectra instead of the mock")
    ap.add_argument("--n", type=int, default=48, help="spectra fitted by both modes")
    ap.add_argument("--chunk", type=int, default=16, help="spectra per reference call")
    args = ap.parse_args()

    import torch

    from ard_sql.science.fastfit import FastFitter
    from ard_sql.science.kinematics import LINE_NAMES, ReferenceFitter
    from ard_sql.science.templates import template_file

    torch.set_num_threads(1)
    tpl = template_file(None)
    if args.synthetic:
        data, source = _synthetic(args.n, tpl), "synthetic (templates x LOSVD + lines)"
    elif args.ard:
        data, source = _from_ard(args.ard, args.n), f"ARD {args.ard}"
    else:
        with tempfile.TemporaryDirectory(prefix="bench_ppxf_") as tmp:
            data, source = _mock(args.n, Path(tmp)), "ard mock --n 300 --seed 1 (galaxies of the first partition)"
    wave, flux, ivar, mask, lsf, z = data
    n = len(z)
    ref, fast = ReferenceFitter(tpl), FastFitter(tpl, threads=1)
    rows = lambda a, sl: None if a is None else (a[sl] if np.ndim(a) == 2 else a)  # noqa: E731
    fast.fit(wave, flux[:2], ivar[:2], rows(mask, slice(0, 2)), rows(lsf, slice(0, 2)), z[:2])  # warm-up

    # the fast fitter takes all the spectra as one batch (as in the build); it runs before and after the
    # reference so that a change of load during the run affects both (its time is the mean of the two)
    def run(fitter, sl):
        c0, w0 = time.process_time(), time.perf_counter()
        res = fitter.fit(wave, flux[sl], ivar[sl], rows(mask, sl), rows(lsf, sl), z[sl])
        return res, time.process_time() - c0, time.perf_counter() - w0

    f1, fc1, fw1 = run(fast, slice(None))
    ref_res, rc, rw = [], 0.0, 0.0
    for a in range(0, n, args.chunk):
        r, c, w = run(ref, slice(a, a + args.chunk))
        ref_res.append(r)
        rc, rw = rc + c, rw + w
    f2, fc2, fw2 = run(fast, slice(None))
    cpu = {"reference": rc, "fast": 0.5 * (fc1 + fc2)}
    wall = {"reference": rw, "fast": 0.5 * (fw1 + fw2)}
    cols = {"reference": {c: np.concatenate([r.columns[c] for r in ref_res]) for c in ref_res[0].columns},
            "fast": f2.columns}

    print(f"source: {source}; {n} spectra; one thread each; torch {torch.__version__}")
    print(f"{'':22s}{'reference':>12s}{'fast':>12s}{'ratio':>10s}")
    for label, d in (("CPU ms / spectrum", cpu), ("wall ms / spectrum", wall)):
        r, f = 1000 * d["reference"] / n, 1000 * d["fast"] / n
        print(f"{label:22s}{r:12.1f}{f:12.1f}{r / f:9.1f}x")
    s_r, s_f = cols["reference"]["VelDisp"], cols["fast"]["VelDisp"]
    ok = np.isfinite(s_r) & np.isfinite(s_f)
    d = np.abs(s_f[ok] - s_r[ok]) / s_r[ok]
    print(f"VelDisp NULL: reference {int((~np.isfinite(s_r)).sum())}, fast {int((~np.isfinite(s_f)).sum())} of {n}")
    print(f"median |dsigma|/sigma = {np.median(d):.4f} (n={ok.sum()}), 90th percentile {np.percentile(d, 90):.4f}")
    allf = []
    for nm in LINE_NAMES:
        f, r, e = cols["fast"][f"{nm}_Flux"], cols["reference"][f"{nm}_Flux"], cols["fast"][f"{nm}_Flux_err"]
        good = np.isfinite(f) & np.isfinite(r) & (f / e > 10)
        if good.any():
            dd = np.abs(f[good] - r[good]) / np.abs(r[good])
            allf.extend(dd)
            print(f"  {nm:10s} S/N>10 n={good.sum():3d}  median |dflux|/flux = {np.median(dd):.4f}")
    if allf:
        print(f"all lines at S/N > 10: median |dflux|/flux = {np.median(allf):.4f} (n={len(allf)}), "
              f"90th percentile {np.percentile(allf, 90):.4f}")


if __name__ == "__main__":
    main()
