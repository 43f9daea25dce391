"""Build layer ``topology``: Web_Class, Dist_Filament, Sigma_5/10 and a 3-D kNN density.

A global layer: the cosmic web needs every position at once. The science is in
``ard_sql.science`` (``positions``, ``density``, ``cosmicweb``, ``skeleton``);
this layer chooses the populations and writes the results per partition
(:func:`compute` does the work on arrays, for tests and benchmarks).

Decisions (all configurable with ``--set topology.<key>=<value>``):

- Positions: comoving Cartesian from (RA, DEC, Z) with an astropy cosmology
  (``cosmology``, default ``Planck18``; a built-in name or e.g.
  ``"FlatLambdaCDM(H0=70, Om0=0.3)"``, the mock survey's), recorded in
  ``ard_meta`` (``topology_cosmology``). Z is the observed redshift: the
  classes live in redshift space (see "What limits Web_Class" below).
- Density-defining population (tracers): galaxies with a reliable redshift,
  ``ZWARN == 0`` and ``SPECTYPE == 'GALAXY'`` and ``Z > zmin`` (0.01). Stars
  and QSOs are never tracers; they get NULLs and flag bit ``NOT_GALAXY``.
- Footprint: a HEALPix coverage map of the tracers (``density.Footprint``).
- Selection function instead of randoms: the expected tracer density is
  ``n(r) x footprint`` (``density.SurveySelection``), with ``n(r)`` the tracers'
  radial distribution smoothed over ``radial_smoothing`` Mpc (default 50),
  averaged over 2^3 points per grid cell. This replaced randoms whose
  redshifts were copied from the tracers: in a narrow field such randoms
  carry the radial clustering of the galaxies, which cancelled most of the
  line-of-sight density contrast (on a 30 deg^2 mock the Spearman correlation
  of the smoothed density with the true one rose from 0.59 to 0.85 in real
  space, and the Web_Class accuracy from 0.46 to 0.58). It also removes the
  randoms' shot noise and the memory of a 10x random catalogue.
- ``Sigma_5``, ``Sigma_10``: Baldry et al. (2006) within +-``dv_kms`` (1000
  km/s); a galaxy whose d_N circle reaches outside the footprint gets flag bit
  ``EDGE``; fewer than N neighbours gives NULL and bit ``FEW_NEIGHBOURS``.
  ``Density_kNN3D``: ``knn``-th neighbour (default 5) 3-D density, redshift space.
- ``Web_Class``: T-web on a CIC grid (``cell`` 3 Mpc, Gaussian ``smoothing`` 4 Mpc,
  ``lambda_th`` 0.2: the mock truth's own smoothing and threshold; the grid
  cell matches the truth's 3 Mpc), cells whose smoothed expected density is
  below half the footprint's (``completeness_min``) are masked (NULL and bit
  ``MASKED``), never counted as voids. Sub-volumes of ``core_cells`` (224) per
  side with buffers of max(5 smoothing, 16 cells) bound the peak memory; the
  long-range tide comes from a coarse survey-wide grid (``cosmicweb.survey_web``).
- ``Dist_Filament``: distance (comoving Mpc) to the nearest segment of the
  persistence-filtered skeleton (``nsigma``, default 3) of the same smoothed
  field; the skeleton is written to ``artifacts/topology/filaments.parquet``
  and shown as the view ``filaments``.

What limits Web_Class (measured on mock catalogues, bench/RESULTS.md):

- Geometry. The tide is non-local; a pencil beam cannot know the matter
  around it. Even the *true* matter field, zeroed outside the cone, gives only
  66% of the true classes on a 3 deg^2 cone to z = 0.35 (30 Mpc across),
  76% on 30 deg^2, 83% on 100 deg^2, 87% on 1000 deg^2. ``ard mock --area 3`` is
  no fair test of the T-web; use at least ~100 deg^2 (e.g. ``--area 100
  --zmax 0.15 --n 40000``, about 0.015 galaxies per Mpc^3).
- Sampling. With 4000 galaxies in 3 deg^2 (0.005 Mpc^-3) shot noise dominates
  on the truth's 4 Mpc scale.
- Redshift-space distortions. The mock's galaxies move with Zel'dovich
  velocities plus 150 sqrt(1+delta) km/s random motions (rms 370 km/s, 5 Mpc).
  Classified with the true (real-space) redshift the layer reaches 72-74% on
  100-1000 deg^2; with the observed redshift 63-66%. Neither friends-of-friends
  finger-of-God compression (Tempel et al. 2014), nor linear (Kaiser)
  reconstruction of the line-of-sight displacement, nor an anisotropic
  Fourier deconvolution improved it on the mock (the random motions dominate
  at 4 Mpc and anti-correlate with the predicted infall), so none is applied.
  Split by the mock's truth (``V_LOS_FLOW``, ``bench/bench_topology_rsd.py``):
  removing the random motions perfectly gives 0.661, reconstructing the flows
  perfectly 0.650: each alone leaves the 70% out of reach; only both (0.715) do.
- Threshold vs bias. lambda_th between 0.15 and 0.3 changes the accuracy by
  < 0.02 on the mock (bias 1.3): the truth's 0.2 is kept. ``lambda_th`` also
  takes three thresholds for the sorted eigenvalues (``--set
  topology.lambda_th=[0.2,0.3,0.35]``). Fitted to the truth of other mocks,
  (0.1, 0.3, 0.55) lifts the redshift-space accuracy to 0.675 (test mock) and
  0.678 (1000 deg^2), but only by moving voids and knots into sheets and
  filaments (void recall 0.69 -> 0.49, knot 0.68 -> 0.48); (0.2, 0.3, 0.35)
  gives 0.654 / 0.672 with the class-mean recall kept; no thresholds reach 0.70,
  nor does a classifier trained on the eigenvalues, the line-of-sight tide and
  the density (0.66-0.68 on a mock it was not trained on). The default stays
  the classic single threshold (bench/RESULTS.md, "Thresholds per eigenvalue").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ard_sql import paths
from ard_sql.science import cosmicweb, density, positions, skeleton

#: Topology_flag bits.
FLAGS: dict[str, int] = {"NOT_GALAXY": 1, "MASKED": 2, "EDGE": 4, "FEW_NEIGHBOURS": 8}
_LAYER_OPTIONS = {
    "cosmology": str, "dv_kms": float, "zmin": float, "knn": int, "radial_smoothing": float,
}
FILAMENTS_FILE = "filaments.parquet"
SETTINGS_FILE = "settings.json"


def filaments_path(ard_dir: Path | str) -> Path:
    """The skeleton table written by this layer."""
    return paths.artifact_dir(ard_dir, "topology") / FILAMENTS_FILE


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], cosmicweb.WebOptions]:
    """Layer options (cosmology, dv_kms, ...) and the T-web options, unknown keys rejected."""
    options = dict(options or {})
    mine = {k: _LAYER_OPTIONS[k](v) for k, v in options.items() if k in _LAYER_OPTIONS}
    web = cosmicweb.WebOptions.from_dict({k: v for k, v in options.items() if k not in _LAYER_OPTIONS})
    return mine, web


def check_options(options: dict[str, Any] | None) -> None:
    """``split_options`` plus the cosmology's name: anything either rejects is a ValueError."""
    mine, _ = split_options(options)
    try:
        positions.get_cosmology(mine.get("cosmology"))
    except ValueError as exc:
        raise ValueError(f"topology layer: {exc}") from None


@dataclass
class TopologyResult:
    """Per-object columns (``n`` rows, NaN / -1 where undefined) and the skeleton."""

    web_code: np.ndarray
    dist_filament: np.ndarray
    sigma: np.ndarray
    """(n, 2) Sigma_5, Sigma_10 in Mpc^-2."""
    knn: np.ndarray
    flag: np.ndarray
    web: cosmicweb.SurveyWeb | None
    timings: dict[str, float]
    settings: dict[str, Any]


def compute(
    ra: np.ndarray, dec: np.ndarray, z: np.ndarray, galaxy: np.ndarray, options: dict[str, Any] | None = None,
) -> TopologyResult:
    """The topology columns for every object; ``galaxy`` marks the tracers (and who gets values)."""
    import time

    mine, web = split_options(options)
    cosmology = mine.get("cosmology", positions.DEFAULT_COSMOLOGY)
    ra, dec, z = (np.asarray(a, dtype=np.float64) for a in (ra, dec, z))
    galaxy = np.asarray(galaxy, bool) & np.isfinite(z) & (z > mine.get("zmin", 0.01))
    n = len(z)
    flag = np.where(galaxy, 0, FLAGS["NOT_GALAXY"]).astype(np.int32)
    web_code = np.full(n, cosmicweb.MASKED_CODE, np.int8)
    dist_fil = np.full(n, np.nan)
    sig = np.full((n, 2), np.nan)
    knn = np.full(n, np.nan)
    timings: dict[str, float] = {}
    settings = {"cosmology": positions.cosmology_name(cosmology), "tracers": "ZWARN == 0 & SPECTYPE == 'GALAXY' & Z > zmin",
                **{k: v for k, v in mine.items() if k != "cosmology"}, **asdict(web)}
    settings.setdefault("radial_smoothing", 50.0)
    settings.setdefault("dv_kms", 1000.0)
    settings.setdefault("knn", 5)
    result = None
    if galaxy.sum() > 10:
        t0 = time.perf_counter()
        rg, dg, zg = ra[galaxy], dec[galaxy], z[galaxy]
        table = positions.distance_table(cosmology, z_max=max(6.0, float(np.ceil(zg.max()))))
        xyz = positions.cartesian(rg, dg, zg, cosmology)
        foot = density.Footprint.from_positions(rg, dg)
        selection = density.SurveySelection.from_tracers(foot, np.linalg.norm(xyz, axis=1), settings["radial_smoothing"])
        timings["positions_footprint_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dm = table.transverse_distance(zg)
        proj = density.projected_density(rg, dg, zg, dm, np.ones(len(zg), bool), n=(5, 10),
                                         dv_kms=settings["dv_kms"], workers=web.workers)
        edge = foot.edge_angle(rg, dg)
        knn[galaxy] = density.knn_density_3d(xyz, xyz, k=settings["knn"], self_in_tracers=np.ones(len(xyz), bool),
                                             workers=web.workers)
        sig[galaxy] = proj.sigma
        timings["sigma_n_knn_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = cosmicweb.survey_web(xyz, xyz, options=web, selection=selection)
        web_code[galaxy] = result.codes
        timings["web_class_skeleton_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if len(result.seg_start):
            dist_fil[galaxy] = skeleton.distance_to_segments(xyz, result.seg_start, result.seg_end, workers=web.workers)
        timings["dist_filament_s"] = time.perf_counter() - t0
        g_flag = np.zeros(galaxy.sum(), np.int32)
        g_flag |= np.where(result.codes < 0, FLAGS["MASKED"], 0)
        g_flag |= np.where(np.nanmax(np.where(np.isfinite(proj.theta), proj.theta, 0), axis=1) > edge, FLAGS["EDGE"], 0)
        g_flag |= np.where(~np.isfinite(proj.sigma).all(axis=1), FLAGS["FEW_NEIGHBOURS"], 0)
        flag[galaxy] |= g_flag
        settings.update({"footprint_nside": foot.nside, "footprint_area_deg2": round(foot.area_deg2, 3),
                         "n_tracers": int(galaxy.sum()), "n_subvolumes": result.n_subvolumes,
                         "subvolume_shape": list(result.subvolume_shape), "n_filament_segments": int(len(result.seg_start))})
    return TopologyResult(web_code, dist_fil, sig, knn, flag, result, timings, settings)


class TopologyLayer:
    """Global layer computing the cosmic-web columns for every core row."""

    name = "topology"
    version = "2"
    core_columns = ("ZWARN", "SPECTYPE")
    check_options = staticmethod(check_options)

    def run_global(self, ard_dir: Path, core: pa.Table, options: dict[str, Any]) -> dict[int, pa.Table]:
        """Return, per partition pixel, TargetID + the topology columns."""
        tid = core.column("TargetID").to_numpy()
        z = core.column("Z").to_numpy(zero_copy_only=False).astype(float)
        zwarn = core.column("ZWARN").fill_null(1).to_numpy()
        spectype = np.asarray(core.column("SPECTYPE").fill_null("").to_pylist(), dtype=object)
        galaxy = (zwarn == 0) & (spectype == "GALAXY")
        res = compute(core.column("RA").to_numpy(), core.column("DEC").to_numpy(), z, galaxy, options)
        if res.web is not None:
            _write_filaments(ard_dir, res.web)
        _write_settings(ard_dir, res.settings)
        valid_web = res.web_code >= 0
        cols = {
            "TargetID": pa.array(tid, pa.int64()),
            "Web_Class": pa.array(list(cosmicweb.web_class_names(res.web_code)), pa.string()),
            "Web_Class_Code": pa.array(res.web_code, pa.int8(), mask=~valid_web),
            "Dist_Filament": pa.array(res.dist_filament, mask=~np.isfinite(res.dist_filament)),
            "Sigma_5": pa.array(res.sigma[:, 0], mask=~np.isfinite(res.sigma[:, 0])),
            "Sigma_10": pa.array(res.sigma[:, 1], mask=~np.isfinite(res.sigma[:, 1])),
            "Density_kNN3D": pa.array(res.knn, mask=~np.isfinite(res.knn)),
            "Topology_flag": pa.array(res.flag, pa.int32()),
        }
        full = pa.table(cols)
        npix = core.column("Npix").to_numpy()
        return {int(p): full.filter(pa.array(npix == p)) for p in np.unique(npix)}

    @staticmethod
    def finalize(ard_dir: Path | str, options: dict[str, Any]) -> dict[str, str]:
        """Cosmology and settings of the run, for ``ard_meta``."""
        path = paths.artifact_dir(ard_dir, "topology") / SETTINGS_FILE
        if not path.exists():
            return {}
        settings = json.loads(path.read_text())
        return {"topology_cosmology": str(settings.get("cosmology", "")),
                "topology_settings": json.dumps(settings, sort_keys=True, default=str)}


def _write_settings(ard_dir: Path | str, settings: dict[str, Any]) -> None:
    path = paths.artifact_dir(ard_dir, "topology") / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.temporary_sibling(path)
    tmp.write_text(json.dumps(settings, sort_keys=True, default=str))
    tmp.replace(path)


def _write_filaments(ard_dir: Path | str, result: cosmicweb.SurveyWeb) -> None:
    a, b = result.seg_start, result.seg_end
    table = pa.table({
        "segment": pa.array(np.arange(len(a), dtype=np.int64)),
        "x0": a[:, 0], "y0": a[:, 1], "z0": a[:, 2],
        "x1": b[:, 0], "y1": b[:, 1], "z1": b[:, 2],
        "persistence_sigma": pa.array(np.asarray(result.persistence, float)),
    })
    path = filaments_path(ard_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.temporary_sibling(path)
    pq.write_table(table, tmp)
    tmp.replace(path)
