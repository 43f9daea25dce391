"""Dist_Filament against the truth: the distance to the skeleton of the mock's true field.

The truth skeleton is the layer's own skeleton code on the true (real-space, noise-free)
density of the mock cone (``build.mock.field.truth_skeleton``), so the comparison measures
what sampling and redshift-space distortions do to Dist_Filament, not the method itself.
Runs the layer on observed and on real-space redshifts of the same galaxies.

    python bench/bench_dist_filament.py [--area 100 --zmax 0.15 --n 40000 --seed 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import median_abs_deviation, spearmanr

from ard_sql.build.layers import topology
from ard_sql.build.mock import field
from ard_sql.build.mock.survey import MockConfig, build_catalog
from ard_sql.science import density, skeleton

MOCK_COSMOLOGY = "FlatLambdaCDM(H0=70, Om0=0.3)"


def main() -> None:
    """Print bias, scatter and binned distributions of Dist_Filament against the truth skeleton."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--area", type=float, default=100.0)
    ap.add_argument("--zmax", type=float, default=0.15)
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    cfg = MockConfig(out=Path(tempfile.mkdtemp()), n=args.n, seed=args.seed, area=args.area, zmax=args.zmax)
    cat, web = build_catalog(cfg)
    gal = cat["SPECTYPE"] == "GALAXY"
    pos = np.stack([cat["X"], cat["Y"], cat["Z_COMOVING"]], axis=1)[gal]
    foot = density.Footprint.from_positions(cat["RA"][gal], cat["DEC"][gal])
    nbar = density.SurveySelection.from_tracers(foot, np.linalg.norm(pos, axis=1)).radial
    a, b = field.truth_skeleton(web, field.ConeGeometry(cfg.area_deg2, cfg.zmax), nbar)
    d_true = skeleton.distance_to_segments(pos, a, b)
    truth_class = cat["WEB_CLASS"][gal]
    print(f"mock {args.area} deg2, z < {args.zmax}, {args.n} targets, seed {args.seed}: truth skeleton {len(a)} segments")
    for zcol in ("Z_OBS", "Z_COSMO"):
        res = topology.compute(cat["RA"], cat["DEC"], cat[zcol], gal, {"cosmology": MOCK_COSMOLOGY})
        d = res.dist_filament[gal]
        ok = np.isfinite(d) & np.isfinite(d_true)
        lr = np.log10((d[ok] + 1) / (d_true[ok] + 1))
        print(f"{zcol}: layer skeleton {len(res.web.seg_start)} segments, {ok.sum()} galaxies, "
              f"Spearman {spearmanr(d[ok], d_true[ok]).statistic:.3f}, median {np.median(d[ok]):.1f} vs {np.median(d_true[ok]):.1f} Mpc, "
              f"log10((d+1)/(d_true+1)) bias {np.median(lr):+.3f} scatter {median_abs_deviation(lr, scale='normal'):.3f} dex, "
              f"|d - d_true| median {np.median(np.abs(d[ok] - d_true[ok])):.1f} Mpc")
        for lo, hi in ((0, 2), (2, 5), (5, 10), (10, 20), (20, np.inf)):
            m = ok & (d_true >= lo) & (d_true < hi)
            if m.any():
                p16, p50, p84 = np.percentile(d[m], [16, 50, 84])
                print(f"  d_true in [{lo}, {hi}) Mpc: {m.sum():6d} galaxies, layer median {p50:.1f} (16-84 %: {p16:.1f}-{p84:.1f})")
        edge = (res.flag[gal] & topology.FLAGS["FILAMENT_EDGE"]) > 0
        if edge.any():  # what the FILAMENT_EDGE galaxies would have read: the same run with the bit off
            off = topology.compute(cat["RA"], cat["DEC"], cat[zcol], gal,
                                   {"cosmology": MOCK_COSMOLOGY, "min_filament_coverage": 0}).dist_filament[gal]
            e = edge & np.isfinite(off) & np.isfinite(d_true)
            le = np.log10((off[e] + 1) / (d_true[e] + 1))
            print(f"  FILAMENT_EDGE (NULL): {edge.sum()} galaxies; with the bit off they read median {np.median(off[e]):.1f} vs "
                  f"true {np.median(d_true[e]):.1f} Mpc, bias {np.median(le):+.3f} scatter {median_abs_deviation(le, scale='normal'):.3f} dex")
        else:
            print("  FILAMENT_EDGE: no galaxy flagged")
        print("  median per true class V/S/F/K: layer", [round(float(np.median(d[ok & (truth_class == c)])), 1) for c in range(4)],
              "truth skeleton", [round(float(np.median(d_true[ok & (truth_class == c)])), 1) for c in range(4)])


if __name__ == "__main__":
    main()
