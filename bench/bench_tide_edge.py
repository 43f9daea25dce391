"""Topology_flag TIDE_EDGE against the truth: how well galaxies whose tide lies mostly outside the survey are classified.

For each mock survey (catalogue only), the layer runs twice on observed redshifts: with the bit on
(its default) to find the flagged galaxies, and off (``min_tide_coverage=0``) to read the class they
would have had. Prints, per survey and pooled, the accuracy of the flagged galaxies, of the others,
and of always answering the survey's commonest class. ``min_kernel_tracers=0`` keeps sparse surveys in.

    python bench/bench_tide_edge.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ard_sql.build.layers import topology
from ard_sql.build.mock.survey import MockConfig, build_catalog

MOCK_COSMOLOGY = "FlatLambdaCDM(H0=70, Om0=0.3)"
#: (area deg^2, zmax, targets, seed): the topology test's mock, narrow ones, a wide one, the demo's.
SURVEYS = [(100, 0.15, 40000, 3), (30, 0.15, 12000, 0), (30, 0.1, 3000, 0), (30, 0.1, 3000, 1), (100, 0.08, 3000, 0),
           (60, 0.1, 3000, 0), (100, 0.1, 10000, 0), (1000, 0.1, 100000, 0), (30, 0.4, 3000, 0), (10, 0.15, 5000, 0)]


def main() -> None:
    """Print the table of bench/RESULTS.md, "Tide at the edge"."""
    total = np.zeros(3)
    for area, zmax, n, seed in SURVEYS:
        cat, _ = build_catalog(MockConfig(out=Path(tempfile.mkdtemp()), n=n, seed=seed, area=float(area), zmax=zmax))
        gal = cat["SPECTYPE"] == "GALAXY"
        opts = {"cosmology": MOCK_COSMOLOGY, "min_kernel_tracers": 0}
        t0 = time.perf_counter()
        on = topology.compute(cat["RA"], cat["DEC"], cat["Z_OBS"], gal, opts)
        seconds = time.perf_counter() - t0
        off = topology.compute(cat["RA"], cat["DEC"], cat["Z_OBS"], gal, {**opts, "min_tide_coverage": 0})
        truth = cat["WEB_CLASS"]
        classed = gal & (off.web_code >= 0)
        edge = classed & ((on.flag & topology.FLAGS["TIDE_EDGE"]) > 0)
        rest = classed & ~edge
        commonest = np.bincount(truth[classed], minlength=4).argmax()
        right = off.web_code == truth
        total += [right[edge].sum(), (truth[edge] == commonest).sum(), edge.sum()]
        print(f"{area} deg2, z < {zmax}, {n} targets, seed {seed}: TIDE_EDGE {edge.sum()} of {classed.sum()} classed "
              f"({edge.sum() / classed.sum():.3f}); accuracy of the flagged {right[edge].mean() if edge.any() else np.nan:.3f}, "
              f"of the others {right[rest].mean():.3f} (all {right[classed].mean():.3f}); layer {seconds:.1f} s", flush=True)
    print(f"pooled: {int(total[2])} flagged, accuracy {total[0] / total[2]:.3f}, "
          f"their survey's commonest class {total[1] / total[2]:.3f}")


if __name__ == "__main__":
    main()
