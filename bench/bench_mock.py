"""Benchmark of the mock survey (issue 3): spectra per second against bagpipes, and peak memory.

Run from the repository root:

    python bench/bench_mock.py --n-synth 2000 --n-bagpipes 20 --memory 10000 30000

* synthesis: ``population.galaxy_population`` + noise-free spectra (SSP sums, dust, velocity
  dispersion, lines, photometry) + DESI resolution + noise, for one batch of galaxies, no files.
* bagpipes: ``bagpipes.model_galaxy`` one galaxy at a time on the same parameters (delayed-tau +
  exponential burst, metallicity, Calzetti A_V, veldisp, redshift, the DESI brz grid), both as
  a new ``model_galaxy`` per galaxy and as ``model.update`` of one built model (what a fitter does).
  Run in the same process; bagpipes is imported inside a temporary working folder (it writes ./pipes).
* end to end: ``run_mock`` (field, physics, spectra, FITS + truth files) in a child process per N,
  with its peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def synthesis(n: int, seed: int = 0) -> tuple[float, dict]:
    """Seconds to make n noisy galaxy spectra in memory, and the parameters of the galaxies."""
    from ard_sql import grid
    from ard_sql.build.mock import objects, population, spectra, ssp, truth

    ssp.ssp_library()  # load once (2 s), not counted
    rdata = truth.arm_resolution_data()
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.05, 0.45, n)
    web = rng.integers(0, 4, n).astype(np.int8)
    delta = rng.normal(0, 1, n)
    t0 = time.perf_counter()
    done = 0
    params = None
    for chunk in np.array_split(np.arange(n), max(1, n // 500)):  # partitions of ~500 targets
        g = population.galaxy_population(z[chunk], web[chunk], delta[chunk], "bright", rng)
        t = {"SPECTYPE": np.full(chunk.size, "GALAXY"), "Z": z[chunk], "LOG_MASS_FORMED": g.sfh.massformed, "SFH_AGE": g.sfh.age,
             "TAU": g.sfh.tau, "METALLICITY": g.sfh.metallicity, "BURST_FRAC": g.sfh.burst_frac, "BURST_AGE": g.sfh.burst_age,
             "BURST_TAU": g.sfh.burst_tau, "TRUNC_AGE": g.sfh.trunc_age, "AGE_UNIVERSE": g.sfh.age_of_universe, "AV": g.av,
             "SIGMA_STAR": g.sigma_star, "SIGMA_GAS": g.sigma_gas,
             **{f"{ln}_Flux": g.line_flux[:, j] for j, ln in enumerate(spectra.LINE_NAMES)}}
        phot, model = truth.intrinsic_spectra_grids(t, [objects.PHOT_WAVE, grid.brz_wavelength()], weights=g.weights)
        for arm, m in truth.instrument_arms(model, rdata).items():
            spectra.add_noise(m, grid.arm_wavelength(arm), "bright", g.fiber_frac, rng)
        done += chunk.size
        if params is None:
            params = {k: np.asarray(v)[:200] for k, v in t.items()}
    return time.perf_counter() - t0, params


def bagpipes_rate(params: dict, n: int) -> dict[str, float]:
    """Seconds per galaxy for bagpipes.model_galaxy (new model per galaxy, and model.update)."""
    from ard_sql import grid

    cwd = os.getcwd()
    tmp = tempfile.mkdtemp(prefix="bench_bagpipes_")
    os.chdir(tmp)
    try:
        import bagpipes as pipes
    finally:
        os.chdir(cwd)
    wave = grid.brz_wavelength().astype(np.float64)

    def comp(i: int) -> dict:
        mf = 10 ** params["LOG_MASS_FORMED"][i]
        bf = params["BURST_FRAC"][i]
        c = {"redshift": float(params["Z"][i]), "veldisp": float(params["SIGMA_STAR"][i]),
             "dust": {"type": "Calzetti", "Av": float(params["AV"][i])},
             "delayed": {"age": float(params["SFH_AGE"][i]), "tau": float(params["TAU"][i]),
                         "massformed": float(np.log10((1 - bf) * mf)), "metallicity": float(params["METALLICITY"][i])}}
        # Always two components so that model.update keeps the same structure (massformed tiny when no burst).
        c["exponential"] = {"age": float(params["BURST_AGE"][i]), "tau": float(max(params["BURST_TAU"][i], 1e-3)),
                            "massformed": float(np.log10(max(bf, 1e-6) * mf)), "metallicity": float(params["METALLICITY"][i])}
        return c

    m = pipes.model_galaxy(comp(0), spec_wavs=wave)  # warm-up (loads the grids)
    t0 = time.perf_counter()
    for i in range(n):
        pipes.model_galaxy(comp(i), spec_wavs=wave)
    t_new = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):
        m.update(comp(i))
    t_upd = (time.perf_counter() - t0) / n
    return {"new_model_s": t_new, "update_s": t_upd}


def end_to_end(n: int, out: str, truth_spectra: bool = True) -> dict[str, float]:
    code = (
        "import time, json, resource; from ard_sql.build.mock.survey import MockConfig, run_mock;"
        f"t=time.perf_counter(); s=run_mock(MockConfig(out=r'{out}', n={n}, seed=1, truth_spectra={truth_spectra}));"
        "s['wall_s']=time.perf_counter()-t; s['maxrss_mb']=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024;"
        "print('RESULT'+json.dumps(s))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-synth", type=int, default=2000, help="galaxies for the in-memory synthesis rate")
    ap.add_argument("--n-bagpipes", type=int, default=20, help="galaxies for bagpipes model_galaxy, one at a time")
    ap.add_argument("--memory", type=int, nargs="*", default=[10000, 30000], help="N values for end-to-end time and peak memory")
    ap.add_argument("--out", default=None, help="scratch folder for the end-to-end mocks (default: a temporary folder)")
    args = ap.parse_args()

    print(f"cpus available: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()}")
    dt, params = synthesis(args.n_synth)
    rate = args.n_synth / dt
    print(f"mock synthesis: {args.n_synth} noisy spectra (B, R, Z arms + photometry grid) in {dt:.2f} s = {rate:.0f} spectra/s")
    if args.n_bagpipes > 0:
        bp = bagpipes_rate(params, args.n_bagpipes)
        print(f"bagpipes model_galaxy, new model per galaxy: {bp['new_model_s'] * 1e3:.0f} ms/galaxy = {1 / bp['new_model_s']:.2f} spectra/s "
              f"-> mock is {rate * bp['new_model_s']:.0f}x faster")
        print(f"bagpipes model.update per galaxy:           {bp['update_s'] * 1e3:.1f} ms/galaxy = {1 / bp['update_s']:.1f} spectra/s "
              f"-> mock is {rate * bp['update_s']:.1f}x faster")
    scratch = args.out or tempfile.mkdtemp(prefix="bench_mock_")
    for n in args.memory:
        r = end_to_end(n, os.path.join(scratch, f"n{n}"))
        print(f"run_mock N={n}: {r['partitions']} partitions, {r['wall_s']:.0f} s wall = {n / r['wall_s']:.0f} targets/s end to end "
              f"(field + physics + spectra + FITS/HDF5/Parquet files), peak RSS {r['maxrss_mb']:.0f} MB")
    print(f"(bench process self maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
