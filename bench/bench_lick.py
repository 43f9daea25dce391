"""Lick layer (issue 4): throughput against pylick, noisy-vs-truth bias and scatter, quenching diagram.

    ard mock --out /tmp/m --n 3000 --seed 5 && ard build /tmp/m --out /tmp/a --layers lick
    python bench/bench_lick.py --mock /tmp/m --ard /tmp/a [--n-pylick 200] [--n-exact 5]

(a) Throughput, one process, one thread (OMP/BLAS pinned to 1): the galaxies of the ARD's HDF5
    store are read (h5py) and measured by ``ard_sql.science.lick.measure_indices`` (all eight
    indices + <Fe>, [MgFe]', errors, flags); pylick 1.0.2 measures the same eight indices with
    errors on the first ``--n-pylick`` of the same spectra (rest-frame wavelengths, good-pixel
    mask from ivar/mask), with its default method ('int': 0.0625 A resampling + Simpson) and,
    on ``--n-exact`` spectra, its 'exact' method (quadrature of the linear interpolant: the
    definition ard_sql computes). Ratios are per spectrum, ours measured before and after pylick
    (mean), so load changes hit both. Also: spectra per second per core from the store
    (read + measure, CPU time).
(b) Noisy vs truth: the ``ard`` view's indices (the layer, noisy spectra) against the same
    indices measured on the mock's noise-free truth spectra (truth_spectra/*.h5, same Z, same
    code), for galaxies with both measured. Per S/N bin (SNR_Median): median and 1.4826*MAD of
    (noisy - truth) and of the pull (noisy - truth) / err.
(c) Quenching diagram (Dn4000 vs Hdelta_A) against the truth POPULATION, redrock galaxies with
    both indices measured. The documented Lick-only post-starburst region is

        Hdelta_A - 2 * Hdelta_A_err > 5 A   and   1.1 < Dn4000 < 1.6

    (HdeltaA strong at 2 sigma above 5 A: A stars dominate; Dn4000 not yet old; the threshold
    is above the star-forming locus, HdeltaA ~ 3-6 A at Dn4000 ~ 1.2, after Kauffmann et al. 2003
    Fig. 6 and Wild et al. 2007). Purity = true post_starburst / selected; completeness =
    selected / all measured true post_starburst. Also shown for the Lick part of
    sql/views/post_starbursts.sql (Hdelta_A > 4 at 3 sigma, 1.1 < Dn4000 < 1.6), which
    additionally needs no Halpha/[OII] emission from the pPXF layer (not applied here), and the
    medians of each population in the plane.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
from scipy.stats import median_abs_deviation  # noqa: E402

EW_NAMES = ["Dn4000", "D4000", "Hdelta_A", "Hgamma_A", "Fe4383", "Mgb", "Fe5270", "Fe5335"]
ALL_NAMES = EW_NAMES + ["Fe_mean", "MgFe_prime"]
SNR_BINS = [0, 2, 4, 8, 16, np.inf]


def psb_region(df):
    """The documented Lick-only post-starburst region (see the module docstring)."""
    return (df.Hdelta_A - 2 * df.Hdelta_A_err > 5) & (df.Dn4000 > 1.1) & (df.Dn4000 < 1.6)


def view_lick_region(df):
    """The Lick part of sql/views/post_starbursts.sql (its emission-line cut is not applied)."""
    return (df.Hdelta_A > 4) & (df.Hdelta_A / df.Hdelta_A_err > 3) & (df.Dn4000 > 1.1) & (df.Dn4000 < 1.6)


def _simps_alias():
    import scipy.integrate

    if not hasattr(scipy.integrate, "simps"):  # pylick 1.0.2 calls the removed simps
        scipy.integrate.simps = lambda y, x=None, even=None, **kw: scipy.integrate.simpson(y, x=x)


def _pylick(wave_rest, flux, ferr, good, method):
    from pylick.measurement import MeasSpectrum

    from ard_sql.science import lick

    regions, units = [], []
    for d in lick.INDICES:
        b = lick.VACUUM_BANDS[d.name]
        regions.append([b["blue"], b.get("central", (0.0, 0.0)), b["red"]])
        units.append("A" if d.kind == "ew" else "break_nu")
    m = MeasSpectrum(wave_rest, flux, ferr, good, np.array(regions), np.array(units),
                     np.array([d.name for d in lick.INDICES]), method, 1.0, np.nan, False)
    return m.vals, m.errs


def load(ard: Path):
    """The ard view (lick + core columns) and the store's galaxies: (df, store dict)."""
    import h5py

    import ard_sql
    from ard_sql.science import lick

    cols = ", ".join(lick.output_names())
    with ard_sql.open(ard) as db:
        df = db.sql(f"SELECT TargetID, Z, SPECTYPE, SNR_Median, {cols} FROM ard").df()
    store = {"files": sorted((ard / "spectra").rglob("*.h5"))}
    tids = []
    for p in store["files"]:
        with h5py.File(p, "r") as h5:
            tids.append(h5["targetid"][...])
    store["targetid"] = np.concatenate(tids)
    return df, store


def throughput(ard: Path, df, store, n_pylick: int, n_exact: int) -> dict:
    import h5py

    from ard_sql.grid import brz_wavelength
    from ard_sql.science import lick

    _simps_alias()
    wave = brz_wavelength()
    zmap = dict(zip(df.TargetID, df.Z))
    gal_ids = set(df.TargetID[(df.SPECTYPE == "GALAXY") & df.Z.notna()])

    def from_store():
        """Read + measure every galaxy of the store, file by file; returns (n, cpu s, wall s, arrays)."""
        c0, w0 = time.process_time(), time.perf_counter()
        n, keep = 0, None
        for p in store["files"]:
            with h5py.File(p, "r") as h5:
                tid = h5["targetid"][...]
                rows = np.flatnonzero([t in gal_ids for t in tid])
                flux, ivar, mask = (h5[k][...][rows] for k in ("flux", "ivar", "mask"))
            z = np.array([zmap[t] for t in tid[rows]])
            lick.measure_indices(wave, flux, ivar, z, mask)
            n += rows.size
            if keep is None:
                keep = (tid[rows], flux, ivar, mask, z)
        return n, time.process_time() - c0, time.perf_counter() - w0, keep

    n_store, cpu_store, wall_store, (tid, flux, ivar, mask, z) = from_store()
    m = min(n_pylick, len(tid))
    flux, ivar, mask, z = flux[:m].astype(np.float64), ivar[:m], mask[:m], z[:m]

    def ours():
        c0 = time.process_time()
        lick.measure_indices(wave, flux, ivar, z, mask)
        return (time.process_time() - c0) / m

    def theirs(method, k):
        c0 = time.process_time()
        for i in range(k):
            good = (ivar[i] > 0) & (mask[i] == 0)
            ferr = 1 / np.sqrt(np.where(good, ivar[i], 1.0))
            _pylick(wave / (1 + z[i]), flux[i], ferr, good, method)
        return (time.process_time() - c0) / k

    ours()  # warm
    t_ours_a = ours()
    t_int = theirs("int", m)
    t_exact = theirs("exact", min(n_exact, m))
    t_ours_b = ours()
    t_ours = 0.5 * (t_ours_a + t_ours_b)
    return {"n_store": n_store, "store_rate_cpu": n_store / cpu_store, "store_rate_wall": n_store / wall_store,
            "n_pylick": m, "n_exact": min(n_exact, m), "ours_us": t_ours * 1e6, "int_us": t_int * 1e6,
            "exact_us": t_exact * 1e6, "ratio_int": t_int / t_ours, "ratio_exact": t_exact / t_ours}


def truth_indices(mock: Path, df):
    """The same indices on the noise-free truth spectra (same Z), for the redrock galaxies of df."""
    import h5py

    from ard_sql.grid import brz_wavelength
    from ard_sql.science import lick

    gal = df[(df.SPECTYPE == "GALAXY") & df.Z.notna()].set_index("TargetID")
    out = []
    for p in sorted((mock / "truth_spectra").glob("*.h5")):
        with h5py.File(p, "r") as h5:
            tid = h5["targetid"][...]
            keep = np.flatnonzero(np.isin(tid, gal.index))
            flux = h5["flux"][...][keep].astype(np.float64)
        res = lick.measure_indices(brz_wavelength(), flux, np.ones_like(flux), gal.loc[tid[keep], "Z"].to_numpy(np.float64))
        import pandas as pd

        out.append(pd.DataFrame({"TargetID": tid[keep], **{f"{n}_true": res[n] for n in ALL_NAMES}}))
    import pandas as pd

    return pd.concat(out).merge(gal.reset_index(), on="TargetID")


def _robust(x):
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.nan, np.nan, 0
    return np.median(x), median_abs_deviation(x, scale="normal"), x.size


def noise_table(both) -> list[str]:
    lines = ["| index | " + " | ".join(f"S/N {lo:g}-{hi:g}" for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:])) + " | all |",
             "| --- |" + " --- |" * len(SNR_BINS)]
    pull_rows = []
    for name in ALL_NAMES:
        cells, pcells = [], []
        for lo, hi in list(zip(SNR_BINS[:-1], SNR_BINS[1:])) + [(0, np.inf)]:
            b = both[(both.SNR_Median >= lo) & (both.SNR_Median < hi)]
            d = b[name].to_numpy(np.float64) - b[f"{name}_true"].to_numpy(np.float64)
            med, sc, n = _robust(d)
            pmed, psc, _ = _robust(d / b[f"{name}_err"].to_numpy(np.float64))
            cells.append(f"{med:+.3f} / {sc:.3f} (n={n})")
            pcells.append(f"{pmed:+.2f} / {psc:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        pull_rows.append(f"| {name} | " + " | ".join(pcells) + " |")
    lines += ["", "Pull (noisy - truth) / err, median / 1.4826 MAD, same bins:", "",
              lines[0], lines[1], *pull_rows]
    return lines


def quenching(mock: Path, df) -> list[str]:
    import pyarrow.parquet as pq

    truth = pq.read_table(mock / "truth.parquet", columns=["TARGETID", "POPULATION"]).to_pandas()
    g = df[(df.SPECTYPE == "GALAXY") & df.Dn4000.notna() & df.Hdelta_A.notna()].merge(truth, left_on="TargetID", right_on="TARGETID")
    psb = g.POPULATION == "post_starburst"
    lines = [f"Galaxies with Dn4000 and HdeltaA measured: {len(g)} ({int(psb.sum())} true post_starburst).", "",
             "| population | n | Dn4000 median [p10, p90] | HdeltaA median [p10, p90] | in PSB region |", "| --- | --- | --- | --- | --- |"]
    region = psb_region(g)
    for pop, s in g.groupby("POPULATION"):
        q = lambda c: f"{s[c].median():.2f} [{s[c].quantile(0.1):.2f}, {s[c].quantile(0.9):.2f}]"  # noqa: E731
        lines.append(f"| {pop} | {len(s)} | {q('Dn4000')} | {q('Hdelta_A')} | {int(region[s.index].sum())} |")
    lines += ["", "| region | selected | purity | completeness | contaminants |", "| --- | --- | --- | --- | --- |"]
    for label, r in (("Lick-only PSB region (documented)", region), ("Lick part of post_starbursts.sql", view_lick_region(g))):
        sel = int(r.sum())
        tp = int((r & psb).sum())
        cont = g[r & ~psb].POPULATION.value_counts().to_dict()
        lines.append(f"| {label} | {sel} | {tp / max(sel, 1):.2f} | {tp / max(int(psb.sum()), 1):.2f} | {cont} |")
    for lo in (5.0,):
        hi_sn = g.SNR_Median >= lo
        r, p = region & hi_sn, psb & hi_sn
        lines.append(f"| documented region, SNR_Median >= {lo:g} | {int(r.sum())} | {int((r & p).sum()) / max(int(r.sum()), 1):.2f} | "
                     f"{int((r & p).sum()) / max(int(p.sum()), 1):.2f} | {g[r & ~p].POPULATION.value_counts().to_dict()} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mock", type=Path, required=True, help="mock survey folder (truth.parquet, truth_spectra/)")
    ap.add_argument("--ard", type=Path, required=True, help="ARD built from it with --layers lick")
    ap.add_argument("--n-pylick", type=int, default=200)
    ap.add_argument("--n-exact", type=int, default=5)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    df, store = load(args.ard)
    print(f"# Lick bench: mock {args.mock}, ARD {args.ard}, {len(df)} targets")
    if not args.skip_throughput:
        t = throughput(args.ard, df, store, args.n_pylick, args.n_exact)
        print("\n## (a) throughput (CPU time, one thread)\n")
        print("| measurement | value |\n| --- | --- |")
        print(f"| ard_sql measure_indices, per spectrum | {t['ours_us']:.0f} us |")
        print(f"| pylick 'int' (default), per spectrum ({t['n_pylick']} spectra) | {t['int_us']:.0f} us |")
        print(f"| pylick 'exact', per spectrum ({t['n_exact']} spectra) | {t['exact_us']:.0f} us |")
        print(f"| ratio pylick 'int' / ard_sql | {t['ratio_int']:.1f}x |")
        print(f"| ratio pylick 'exact' / ard_sql | {t['ratio_exact']:.0f}x |")
        print(f"| from the HDF5 store, read + measure, {t['n_store']} galaxies | {t['store_rate_cpu']:.0f} spectra/s/core (CPU); "
              f"{t['store_rate_wall']:.0f} spectra/s wall |")
    both = truth_indices(args.mock, df)
    print(f"\n## (b) noisy vs noise-free truth ({len(both)} galaxies); median / 1.4826 MAD of (noisy - truth)\n")
    print("\n".join(noise_table(both)))
    print("\n## (c) quenching diagram\n")
    print("\n".join(quenching(args.mock, df)))


if __name__ == "__main__":
    main()
