"""Benchmark of the topology layer (issue 8): Sigma_5/10 + kNN, Web_Class and Dist_Filament
for N synthetic galaxies, with timings per step and peak memory.

The galaxies are a log-normal field (``ard_sql.science.cosmicweb_synthetic``)
in a box with the observer at one corner, cut to the octant sphere r < L
(1/8 of the sky, 5157 deg^2), at a mean density of ``--nbar`` (default 0.01
Mpc^-3, about DESI BGS at low redshift); RA, DEC and redshift follow from the
positions (Planck18). The catalogue is made in a child process and cached, so
that the peak memory reported is that of the layer's computation alone.

    python bench/bench_topology.py --n 1000000
    python bench/bench_topology.py --n 10000000 --workers 2

Prints one JSON line with the timings (s) and the peak resident memory (GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_catalog(n: int, nbar: float, seed: int, path: Path) -> None:
    """Write ``ra, dec, z`` of ``n`` galaxies to ``path`` (npz)."""
    from astropy.cosmology import Planck18

    from ard_sql.science.cosmicweb_synthetic import lognormal_catalog

    side = (6.0 * n / (np.pi * nbar)) ** (1.0 / 3.0)
    grid = int(min(384, max(64, 2 * round(side / 4.0 / 2))))
    cat = lognormal_catalog(int(n * 6.0 / np.pi * 1.03), side, grid=grid, seed=seed)
    pts = cat.points
    del cat
    r = np.linalg.norm(pts, axis=1)
    keep = np.flatnonzero((r < side) & (r > 20.0))
    rng = np.random.default_rng(seed)
    keep = rng.choice(keep, size=min(n, keep.size), replace=False)
    pts, r = pts[keep], r[keep]
    zz = np.expm1(np.linspace(0, np.log1p(2.0), 20000))
    z = np.interp(r, Planck18.comoving_distance(zz).value, zz)
    ra = np.degrees(np.arctan2(pts[:, 1], pts[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(pts[:, 2] / r))
    np.savez(path, ra=ra, dec=dec, z=z, side=side, grid=grid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nbar", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--set", action="append", default=[], help="topology option key=value (e.g. cell=4)")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = Path(args.cache) / f"bench_topology_{args.n}_{args.nbar}_{args.seed}.npz"
    if args.make_only:
        make_catalog(args.n, args.nbar, args.seed, path)
        return
    t0 = time.perf_counter()
    if not path.exists():
        subprocess.run([sys.executable, __file__, "--make-only", "--n", str(args.n), "--nbar", str(args.nbar),
                        "--seed", str(args.seed), "--cache", args.cache], check=True)
    t_make = time.perf_counter() - t0
    data = np.load(path)
    ra, dec, z = data["ra"], data["dec"], data["z"]
    from ard_sql.build.layers import topology

    options: dict = {"workers": args.workers}
    for item in args.set:
        key, _, value = item.partition("=")
        options[key] = value if key == "cosmology" else float(value) if "." in value or "e" in value else int(value)
    t0 = time.perf_counter()
    res = topology.compute(ra, dec, z, np.ones(len(z), bool), options)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB on Linux
    out = {
        "n_galaxies": int(len(z)), "box_side_mpc": float(data["side"]), "nbar": args.nbar, "workers": args.workers,
        "catalog_s (not counted)": round(t_make, 1), "total_s": round(total, 1),
        **{k: round(v, 1) for k, v in res.timings.items()},
        "peak_rss_gib": round(peak, 2),
        "web_class_fractions": np.round(np.bincount(res.web_code[res.web_code >= 0], minlength=4) / max(1, (res.web_code >= 0).sum()), 3).tolist(),
        "masked_fraction": round(float((res.web_code < 0).mean()), 4),
        "median_dist_filament_mpc": round(float(np.nanmedian(res.dist_filament)), 2),
        "subvolumes": res.settings.get("n_subvolumes"), "subvolume_shape": res.settings.get("subvolume_shape"),
        "filament_segments": res.settings.get("n_filament_segments"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
