"""What the redshift-space distortions cost Web_Class on the mock, split by their two parts.

The mock's line-of-sight velocity is a coherent Zel'dovich flow (truth column
``V_LOS_FLOW``) plus a random motion inside structures (``V_LOS - V_LOS_FLOW``,
150 sqrt(1 + delta) km/s rms). This script classifies the same mock catalogue
(``build_catalog``: positions and truth of ``ard mock`` without spectra) with
four redshifts and prints the accuracy against the truth class of each:

* ``observed``: Z, both parts (what the layer sees);
* ``real space``: Z_COSMO, neither part (what a perfect reconstruction would give);
* ``flows only``: Z_COSMO shifted by V_LOS_FLOW (a perfect removal of the random motions);
* ``random only``: Z_COSMO shifted by the random part (a perfect reconstruction of the flows).

So it bounds what each kind of correction (finger-of-God compression for the
random motions, Kaiser/Zel'dovich reconstruction for the flows) could win.

    python bench/bench_topology_rsd.py                      # the test's 100 deg^2, z < 0.15, 40 000 targets
    python bench/bench_topology_rsd.py --area 1000 --zmax 0.1 --n 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

MOCK_COSMOLOGY = "FlatLambdaCDM(H0=70, Om0=0.3)"  # the mock survey's own (build/mock/ssp.py)


def accuracies(n: int, seed: int, area: float, zmax: float) -> tuple[dict[str, tuple[float, np.ndarray]], dict[str, float]]:
    """Web_Class accuracy and confusion matrix (rows truth, columns layer) for each redshift variant,
    and the rms (km/s) of the flow and random parts of the line-of-sight velocity."""
    from ard_sql.build.layers import topology
    from ard_sql.build.mock.field import observed_redshift
    from ard_sql.build.mock.survey import MockConfig, build_catalog
    from ard_sql.science.cosmicweb import confusion_matrix

    with tempfile.TemporaryDirectory() as tmp:
        cat, _ = build_catalog(MockConfig(out=Path(tmp), n=n, seed=seed, area=area, zmax=zmax))
    gal = cat["SPECTYPE"] == "GALAXY"
    z_cos, v, v_flow = cat["Z_COSMO"], cat["V_LOS"], cat["V_LOS_FLOW"]
    variants = {
        "observed": cat["Z_OBS"],
        "real space": z_cos,
        "flows only": observed_redshift(z_cos, v_flow),
        "random only": observed_redshift(z_cos, v - v_flow),
    }
    out = {}
    truth = cat["WEB_CLASS"][gal]
    for name, z in variants.items():
        res = topology.compute(cat["RA"], cat["DEC"], z, gal, {"cosmology": MOCK_COSMOLOGY})
        cm = confusion_matrix(truth, res.web_code[gal])
        out[name] = (float(np.trace(cm) / cm.sum()), cm)
    rms = {"flow": float(np.std(v_flow[gal])), "random": float(np.std((v - v_flow)[gal]))}
    return out, rms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40000, help="targets in the mock catalogue")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--area", type=float, default=100.0, help="deg^2")
    ap.add_argument("--zmax", type=float, default=0.15)
    args = ap.parse_args()
    t0 = time.perf_counter()
    acc, rms = accuracies(args.n, args.seed, args.area, args.zmax)
    print(f"mock: {args.area} deg^2, z < {args.zmax}, {args.n} targets, seed {args.seed}; "
          f"rms V_LOS_FLOW {rms['flow']:.0f} km/s, rms random {rms['random']:.0f} km/s")
    for name, (a, cm) in acc.items():
        print(f"{name:12s} accuracy {a:.4f}  confusion {cm.tolist()}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
