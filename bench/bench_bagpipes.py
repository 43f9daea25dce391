"""Bagpipes layer benchmark: amortized posteriors vs Bagpipes fits, and their calibration.

Prints, from ONE run on this machine:

1. calibration of the amortized estimator on held-out simulations of the
   forward model (central-interval coverage at 10 %...90 %, per quantity;
   the 68 % row is the acceptance number) and a calibration figure
   (``--figure``, default ``bench/bagpipes_calibration.png``);
2. speed: ms per galaxy of the amortized estimator in batches of brz-grid
   spectra, one Bagpipes (nautilus) fit's wall time, and their ratio;
3. agreement on the galaxies Bagpipes fitted (``--n-fits`` held-out
   simulations): median |dLogMass_p50| amortized - Bagpipes, and both vs truth;
4. with ``--ard DIR --truth DIR/truth.parquet`` (a mock survey built with the
   bagpipes layer): 68 % coverage and median |d| against the mock's truth
   (its LOG_MASS is the surviving mass, as ours; its SFHs have bursts and
   truncations that the delayed-tau model lacks, so this is a test of
   model mismatch, not of calibration). A mock made with ``ard mock --physics
   prior`` draws its galaxies from our priors: there the same numbers are a
   simulation-based calibration through the mock's own physics and files,
   and the coverage at every level is plotted like the held-out one
   (``--mock-figure``, default ``bench/bagpipes_mock_calibration.png``);
5. with ``--in-model`` as well: the mock's plain delayed-tau galaxies
   (populations star_forming, quiescent, agn_*) re-simulated with bagpipes'
   own forward model at their true parameters and S/N, and the coverage
   again: equal numbers mean the misses come from where the galaxies sit in
   the prior (conditional vs average calibration), not from the mock's
   physics.

    python bench/bench_bagpipes.py --n-fits 2 --n-live 100
    python bench/bench_bagpipes.py --n-fits 0 --ard /tmp/a --truth /tmp/m/truth.parquet --in-model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import median_abs_deviation

from ard_sql import grid
from ard_sql.build.layers import bagpipes as layer
from ard_sql.build.mock.truth import t_quench_truth
from ard_sql.science import amortized as am
from ard_sql.science import pipes_env
from ard_sql.science import pipes_fit as pf
from ard_sql.science import pipes_model as pm

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6827, 0.8, 0.9)


def calibration(est, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray, truth: dict[str, np.ndarray],
                model_error: bool = True) -> dict[str, list[float]]:
    """Coverage of central intervals at LEVELS, per quantity, of binned spectra with known truth.

    ``truth`` has every quantity in reported units (NaN where unknown: that quantity is skipped);
    it goes through the network's target space and back, so the floors (SFR, sSFR) are the posteriors'.
    ``model_error=False``: the statistical posterior alone (for simulations of the model itself).
    """
    probs = sorted({p for lv in LEVELS for p in ((1 - lv) / 2, (1 + lv) / 2)})
    q = est.quantiles_binned(flux, ivar, z, tuple(probs), model_error)
    t = am.to_target_space(truth)
    out = {}
    for j, name in enumerate(pf.QUANTITIES):
        tv = am.from_target_space(name, t[:, j])
        ok = np.isfinite(tv)
        if not ok.any():
            continue
        cov = []
        for lv in LEVELS:
            lo, hi = q[ok, j, probs.index((1 - lv) / 2)], q[ok, j, probs.index((1 + lv) / 2)]
            cov.append(float(np.mean((tv[ok] >= lo) & (tv[ok] <= hi))))
        out[name] = cov
    return out


def print_calibration(title: str, cal: dict[str, list[float]]) -> None:
    """The coverage table of :func:`calibration`, one row per quantity."""
    print(f"\n## {title} (central-interval coverage)")
    print("quantity    " + " ".join(f"{lv:>6.2f}" for lv in LEVELS))
    for name, cov in cal.items():
        print(f"{name:<11} " + " ".join(f"{c:>6.3f}" for c in cov))


def figure(cal: dict[str, list[float]], path: Path, n: int, what: str = "held-out simulations") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    band = 1.96 * np.sqrt(np.array(LEVELS) * (1 - np.array(LEVELS)) / n)
    ax.fill_between(LEVELS, np.array(LEVELS) - band, np.array(LEVELS) + band, color="0.85", label="95% binomial")
    for name, cov in cal.items():
        ax.plot(LEVELS, cov, "o-", ms=3, label=name)
    ax.axvline(0.6827, color="0.6", lw=0.5)
    ax.set_xlabel("nominal central-interval level")
    ax.set_ylabel(f"fraction of {what} covered")
    ax.set_title(f"amortized posterior calibration: {what} (n={n})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


#: Truth column of every quantity; t_quench in the layer's definition, from the mock's true SFH
#: (``build.mock.truth.t_quench_truth``; NaN where a non-delayed-tau history has not fallen yet).
T_QUENCH_TRUTH = "T_QUENCH_LAYER_DEFINITION"
TRUTH_COLUMNS = {**layer.MOCK_TRUTH, "t_quench": T_QUENCH_TRUTH}


def amortized_mock_rows(ard: Path, truth_file: Path) -> pd.DataFrame:
    """The layer's amortized rows of the mock's galaxies, joined with their truth rows (one query for every check)."""
    import duckdb

    df = duckdb.connect().sql(f"""SELECT b.*, t.* EXCLUDE (TARGETID)
                     FROM read_parquet('{ard}/staging/bagpipes/dataset/**/*.parquet') b
                     JOIN read_parquet('{truth_file}') t ON t.TARGETID = b.TargetID
                     WHERE b.LogMass_p50 IS NOT NULL AND b.Physics_Source = 'amortized' AND t.SPECTYPE = 'GALAXY'
                     """).df()
    df[T_QUENCH_TRUTH] = t_quench_truth(df)
    return df


def mock_spectra(ard: Path, truth_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Binned spectra, Z and truth (our quantities' names) of the mock galaxies the layer gave amortized rows."""
    rows = amortized_mock_rows(ard, truth_file).set_index("TargetID")
    wanted = rows.index.to_numpy()
    data = layer.binned_spectra(ard, lambda core: np.isin(core.column("TargetID").to_numpy(), wanted))
    t = rows.loc[data["TargetID"]]
    truth = {q: t[col].to_numpy(float) for q, col in TRUTH_COLUMNS.items()}
    return data["flux"], data["ivar"], data["z"], truth


def _truth_stats(df: pd.DataFrame) -> dict[str, object]:
    """68 % coverage, median (absolute) offset and its scatter (1.4826 MAD) of the amortized rows in ``df`` against the mock truth."""
    out = {"n": len(df)}
    for q, col in TRUTH_COLUMNS.items():
        tv = df[col].to_numpy(float)
        if q == "SFR":
            tv = pm.floor_sfr(tv)  # the truth floored as the rows are
        if q == "sSFR":
            tv = pm.floor_ssfr(tv)
        ok = np.isfinite(tv)
        lo, mid, hi = (df[f"{q}_p{p}"].to_numpy(float)[ok] for p in (16, 50, 84))
        tv = tv[ok]
        cov = float(np.mean((tv >= lo) & (tv <= hi)))
        d = np.log10(mid) - np.log10(tv) if q in ("SFR", "Metallicity", "Tau") else mid - tv
        bias = float(np.median(d))
        out[q] = {"coverage68": round(cov, 3), "median_abs_d": round(float(np.median(np.abs(d))), 3),
                  "median_d": round(bias, 3), "scatter": round(float(median_abs_deviation(d, scale="normal")), 3)}
    return out


def mock_comparison(ard: Path, truth_file: Path, min_population: int = 20) -> dict[str, object]:
    """Amortized rows against the mock truth: all galaxies, and each population of at least ``min_population``."""
    df = amortized_mock_rows(ard, truth_file)
    out = _truth_stats(df)
    out["by_population"] = {pop: _truth_stats(g) for pop, g in df.groupby("POPULATION") if len(g) >= min_population}
    return out


def in_model_comparison(ard: Path, truth_file: Path, est, seed: int = 1) -> dict:
    """Coverage on the mock's delayed-tau galaxies re-simulated by bagpipes at their true parameters and S/N."""
    import duckdb

    from ard_sql.science.pipes_sim import Simulator, add_noise

    con = duckdb.connect()
    df = con.sql(f"""SELECT c.Z, c.SNR_Median, t.* EXCLUDE (TARGETID, Z)
                     FROM read_parquet('{ard}/staging/core/dataset/**/*.parquet') c
                     JOIN read_parquet('{truth_file}') t ON t.TARGETID = c.TargetID
                     WHERE t.POPULATION IN ('star_forming', 'quiescent', 'agn_seyfert', 'agn_liner')
                       AND c.Z BETWEEN {am.Z_MIN} AND {am.Z_MAX} AND c.SNR_Median > 0
                     ORDER BY c.TargetID""").df()  # a fixed order: the seed then fixes every noise draw
    sim, rng = Simulator(), np.random.default_rng(seed)
    theta = df[["LOG_MASS_FORMED", "SFH_AGE", "TAU", "METALLICITY", "AV"]].to_numpy(float).copy()
    # The mock's oldest galaxies start at its Big Bang; bagpipes' own age table is a hair younger.
    theta[:, 1] = np.minimum(theta[:, 1], 0.995 * pm.age_of_universe(df.Z.to_numpy()))
    flux, truth = sim.spectra(theta, df.Z.to_numpy(), df.SIGMA_STAR.to_numpy())
    flux, ivar = add_noise(flux, sim.wave, df.SNR_Median.to_numpy(), rng, pixels_per_bin=pm.FIT_BIN)
    q = est.percentiles_binned(flux, ivar, df.Z.to_numpy(), model_error=False)  # bagpipes' own model: no model error
    return {"n": len(df), **{k: round(v, 3) for k, v in am.coverage(q, truth).items()}}


def daemon_fit_comparison(ard: Path, truth_file: Path | None) -> list[dict]:
    """Amortized (recomputed) vs the daemon's Bagpipes fits on the targets it fitted (and the mock truth)."""
    import pyarrow.parquet as pq

    from ard_sql import paths, spectra_store
    from ard_sql.build import hats_writer

    est = layer.load_estimator(ard)
    truth = None
    if truth_file:
        truth = pq.read_table(truth_file, columns=["TARGETID", "LOG_MASS"]).to_pandas().set_index("TARGETID")
    out = []
    for order, pixel, f in hats_writer.partition_files(ard, paths.CORE):
        fits = layer.read_fits(ard, order, pixel)
        if fits is None:
            continue
        fits = fits.to_pandas()
        fits = fits[fits.LogMass_p50.notna()]
        if fits.empty:
            continue
        core = pq.read_table(f, columns=["TargetID", "Z"]).to_pandas().set_index("TargetID")
        tids = fits.TargetID.to_numpy()
        spec = spectra_store.read_partition(ard, order, pixel, tids)
        rows = est.predict_rows(tids, core.loc[tids, "Z"].to_numpy(), spec.flux, spec.ivar)
        for (_, fit), a in zip(fits.iterrows(), rows):
            out.append({"TargetID": int(fit.TargetID),
                        "bagpipes": [round(fit[f"LogMass_p{p}"], 3) for p in (16, 50, 84)],
                        "amortized": [round(a[f"LogMass_p{p}"], 3) for p in (16, 50, 84)],
                        "truth": None if truth is None else round(float(truth.loc[int(fit.TargetID), "LOG_MASS"]), 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(pipes_env.cache_dir() / "amortized"), help="estimator/simulation cache")
    ap.add_argument("--n-fits", type=int, default=2, help="Bagpipes fits of held-out simulations (minutes each)")
    ap.add_argument("--n-live", type=int, default=100, help="nautilus live points of those fits")
    ap.add_argument("--n-networks", type=int, default=1)
    ap.add_argument("--snr", type=float, default=8.0, help="median S/N per pixel of the fitted simulations")
    ap.add_argument("--figure", default=str(Path(__file__).with_name("bagpipes_calibration.png")))
    ap.add_argument("--mock-figure", default=str(Path(__file__).with_name("bagpipes_mock_calibration.png")),
                    help="with --ard/--truth: the same calibration plot for the mock galaxies")
    ap.add_argument("--ard", help="ARD built from a mock with the bagpipes layer")
    ap.add_argument("--truth", help="the mock's truth.parquet")
    ap.add_argument("--in-model", action="store_true",
                    help="with --ard/--truth: also re-simulate the mock's delayed-tau galaxies with bagpipes' own model")
    args = ap.parse_args()

    opts = layer.options({})
    t0 = time.perf_counter()
    path, info = layer.train_estimator(Path(args.cache), opts, log=print)
    est = am.AmortizedEstimator.load(path)
    print(f"estimator {path.name}: {info['config']['n_sims']} simulations, "
          f"simulate {info['simulate_seconds']} s + train {info['train_seconds']} s (as cached); ready in "
          f"{time.perf_counter() - t0:.1f} s")

    if "model_error" in info:
        print(f"model error (added in quadrature; from {info['model_error_n']} prior-drawn mock galaxies): "
              f"{info['model_error']}\n  their 68 % coverage without it {info['model_error_coverage68_before']}"
              f"\n  with it {info['model_error_coverage68_after']}")

    # 1. calibration on held-out simulations: the statistical posterior (the model error is not in them)
    test = layer.heldout_set(Path(args.cache), opts)
    cal = calibration(est, test["flux"], test["ivar"], test["z"], {k: test[f"truth_{k}"] for k in pf.QUANTITIES},
                      model_error=False)
    n = len(test["z"])
    print_calibration(f"calibration on {n} held-out simulations (statistical posterior)", cal)
    figure(cal, Path(args.figure), n)
    print(f"figure: {args.figure}")
    q = est.percentiles_binned(test["flux"], test["ivar"], test["z"], model_error=False)
    print(f"median |LogMass_p50 - truth| (held-out sims): {np.median(np.abs(q[:, 0, 1] - test['truth_LogMass'])):.3f} dex")

    # 2. speed
    rng = np.random.default_rng(0)
    nb = 2000
    flux = (1 + 0.1 * rng.standard_normal((nb, grid.NPIX))).astype(np.float32)
    ivar = np.full((nb, grid.NPIX), 25.0, np.float32)
    z = rng.uniform(0.05, 0.8, nb)
    est.predict_rows(np.arange(100), z[:100], flux[:100], ivar[:100])
    t0 = time.perf_counter()
    est.predict_rows(np.arange(nb), z, flux, ivar)
    per = (time.perf_counter() - t0) / nb
    print(f"\n## speed\namortized: {per * 1e3:.2f} ms/galaxy (batch of {nb} brz spectra, 1 process)")

    # 3. Bagpipes fits of held-out simulations
    if args.n_fits:
        from ard_sql.science.pipes_sim import simulate_brz

        cfg = pf.FitConfig(n_live=args.n_live, n_networks=args.n_networks)
        rows = []
        for i in range(args.n_fits):
            zi = float(rng.uniform(0.05, 0.5))
            theta = pm.sample_prior(1, np.array([zi]), rng)[0]
            theta[0] = rng.uniform(9.5, 11.5)  # a DESI-like mass
            f, iv, truth = simulate_brz(theta, zi, args.snr, rng, veldisp=150.0)
            res = pf.fit_galaxy(i, zi, f, iv, veldisp=150.0, workdir=Path(args.cache) / "bench_work", config=cfg)
            a = est.predict_rows(np.array([i]), np.array([zi]), f[None], iv[None])[0]
            rows.append((res, a, truth))
            print(f"fit {i}: z={zi:.3f} {res.runtime_s:.0f} s ({res.message}); LogMass truth {truth['LogMass']:.3f} "
                  f"bagpipes {res.row['LogMass_p50']} amortized {a['LogMass_p50']:.3f}")
        ok = [(r, a, t) for r, a, t in rows if r.row["LogMass_p50"] is not None]
        t_fit = float(np.mean([r.runtime_s for r, _, _ in rows]))
        print(f"one Bagpipes fit (nautilus n_live={args.n_live}, n_networks={args.n_networks}): {t_fit:.0f} s "
              f"-> amortized is {t_fit / per:,.0f} x faster per galaxy")
        if ok:
            d = [abs(a["LogMass_p50"] - r.row["LogMass_p50"]) for r, a, _ in ok]
            print(f"median |dLogMass_p50| amortized - Bagpipes over {len(ok)} fits: {np.median(d):.3f} dex")
            print(json.dumps([{"truth": round(t["LogMass"], 3), "bagpipes": [round(r.row[f'LogMass_p{p}'], 3) for p in (16, 50, 84)],
                               "amortized": [round(a[f'LogMass_p{p}'], 3) for p in (16, 50, 84)]} for r, a, t in ok]))

    # 4. mock truth
    if args.ard and args.truth:
        print("\n## against the mock truth (amortized rows of the built ARD)")
        print(json.dumps(mock_comparison(Path(args.ard), Path(args.truth)), indent=1))
        mf, mi, mz, mt = mock_spectra(Path(args.ard), Path(args.truth))
        ard_est = am.AmortizedEstimator.load(layer.estimator_file(args.ard))
        mcal = calibration(ard_est, mf, mi, mz, mt)
        print_calibration(f"calibration on the {len(mz)} mock galaxies (estimator of the ARD)", mcal)
        figure(mcal, Path(args.mock_figure), len(mz), what=f"mock galaxies ({Path(args.truth).parent.name})")
        print(f"figure: {args.mock_figure}")
        if args.in_model:
            print("\n## the same galaxies' parameters through bagpipes' own model (plain delayed-tau populations; "
                  "estimator of the ARD)")
            print(json.dumps(in_model_comparison(Path(args.ard), Path(args.truth),
                                                 am.AmortizedEstimator.load(layer.estimator_file(args.ard)))))
    if args.ard:
        cmp = daemon_fit_comparison(Path(args.ard), Path(args.truth) if args.truth else None)
        if cmp:
            d = [abs(c["amortized"][1] - c["bagpipes"][1]) for c in cmp]
            print(f"\n## amortized vs the daemon's Bagpipes fits ({len(cmp)} galaxies of {args.ard})")
            print(f"median |dLogMass_p50| = {np.median(d):.3f} dex")
            print(json.dumps(cmp))


if __name__ == "__main__":
    main()
