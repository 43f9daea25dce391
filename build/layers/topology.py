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
  and QSOs are never tracers; they get NULLs and flag bit ``NOT_GALAXY``. A
  galaxy whose redshift is unreliable (``ZWARN != 0``) or out of range (Z not
  finite, or ``<= zmin``) gets NULLs and bit ``BAD_REDSHIFT``. With fewer than
  ``MIN_TRACERS`` (11) tracers nothing is computed: the tracers get NULLs and
  bit ``FEW_TRACERS``.
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
  ``EDGE``. The neighbours are the other tracers within the velocity window,
  at any distance on the sky: with fewer than 10 Sigma_10 is NULL, with fewer
  than 5 Sigma_5 as well, and bit ``FEW_NEIGHBOURS`` is set (Sigma_5 present
  beside it means 5-9 neighbours).
  ``Density_kNN3D``: ``knn``-th neighbour (default 5) 3-D density, redshift space;
  NULL with the same bit ``FEW_NEIGHBOURS`` only where the whole survey has no
  more than ``knn`` tracers, for every tracer at once (possible only with
  ``knn`` >= ``MIN_TRACERS``: fewer tracers is ``FEW_TRACERS``). When the N-th
  (or ``knn``-th) neighbour lies at distance 0 (duplicate positions) the density
  is infinite: NULL and bit ``COINCIDENT_NEIGHBOURS``.
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
  and shown as the view ``filaments``. A skeleton with no segment (no
  filament above ``nsigma``) leaves Dist_Filament NULL with bit ``NO_SKELETON``.
  Where less than ``min_filament_coverage`` (0.3) of the ball reaching from a
  galaxy to its nearest segment lies inside the survey, a nearer filament may
  lie unobserved: Dist_Filament is NULL with bit ``FILAMENT_EDGE``.
- Writes: :meth:`TopologyLayer.run_global` writes nothing; the orchestrator
  writes the partitions and then the artifacts the layer stages
  (:meth:`TopologyLayer.stage_artifacts`), so a failed run leaves the previous
  partitions, skeleton and settings as they were.

``Topology_flag`` bits (:data:`FLAGS`, meanings in :data:`FLAG_MEANINGS`):
1 NOT_GALAXY, 2 MASKED, 4 EDGE, 8 FEW_NEIGHBOURS, 16 BAD_REDSHIFT,
32 FEW_TRACERS, 64 NO_SKELETON, 128 COINCIDENT_NEIGHBOURS, 256 SPARSE, 512 TIDE_EDGE,
1024 FILAMENT_EDGE.

What limits Web_Class (measured on mock catalogues, bench/RESULTS.md):

- Geometry. The tide is non-local; a pencil beam cannot know the matter
  around it. Even the *true* matter field, zeroed outside the cone, gives only
  66% of the true classes on a 3 deg^2 cone to z = 0.35 (30 Mpc across),
  76% on 30 deg^2, 83% on 100 deg^2, 87% on 1000 deg^2. ``ard mock --area 3`` is
  no fair test of the T-web; use at least ~100 deg^2 (e.g. ``--area 100
  --zmax 0.15 --n 40000``, about 0.015 galaxies per Mpc^3). Per galaxy, only the
  extreme is detectable: where less than ``min_tide_coverage`` (0.3) of the ball
  of radius 4 x smoothing around a galaxy lies in the survey, its classes were
  right 37 % of the time against 60 % for a constant guess, so Web_Class is NULL
  with bit ``TIDE_EDGE`` (0.8 % of the 100 deg^2 test mock's classed galaxies). A narrow survey
  whose galaxies are all moderately enclosed is poor everywhere, and no
  per-galaxy distance to the edge predicts it (bench/RESULTS.md).
- Sampling. With 4000 galaxies in 3 deg^2 (0.005 Mpc^-3) shot noise dominates
  on the truth's 4 Mpc scale. Where fewer than ``min_kernel_tracers`` (2) tracers
  are expected inside the smoothing kernel, n(r) (2 pi)^1.5 R^3, Web_Class and
  Dist_Filament are NULL with bit ``SPARSE`` (:data:`MIN_KERNEL_TRACERS`); the
  3000-target demo (30 deg^2 to z = 0.4, ~3e-4 Mpc^-3) is sparse everywhere.
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
  Six more mocks of the same configuration average 0.702 (real space) and
  0.618 (observed); drawn on a periodic box with 100 Mpc margins instead of the
  mock's 20 (a truer tide for the truth), 0.668 and 0.597.
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
from ard_sql.build.layers.base import fraction, number, parse_options, positive, positive_integer
from ard_sql.science import cosmicweb, density, positions, skeleton

#: Topology_flag bits (values are stable: new bits take unused positions).
FLAGS: dict[str, int] = {
    "NOT_GALAXY": 1, "MASKED": 2, "EDGE": 4, "FEW_NEIGHBOURS": 8,
    "BAD_REDSHIFT": 16, "FEW_TRACERS": 32, "NO_SKELETON": 64, "COINCIDENT_NEIGHBOURS": 128, "SPARSE": 256,
    "TIDE_EDGE": 512, "FILAMENT_EDGE": 1024,
}
#: What each Topology_flag bit means (the columns it leaves NULL, if any).
FLAG_MEANINGS: dict[str, str] = {
    "NOT_GALAXY": "SPECTYPE is not GALAXY (star, QSO, unknown): not a tracer, every value NULL",
    "MASKED": "the T-web cell is outside the survey mask: Web_Class NULL",
    "EDGE": "the Sigma_N circle reaches outside the footprint: Sigma_N underestimated",
    "FEW_NEIGHBOURS": "fewer than 10 other tracers within +-dv_kms (default 1000 km/s) of the galaxy, anywhere "
                      "on the sky: Sigma_10 NULL; fewer than 5: Sigma_5 NULL too (so Sigma_5 present with this bit "
                      "means 5-9 neighbours). Density_kNN3D NULL by this bit only where the whole survey has no "
                      "more than knn tracers (only with knn >= 11, as fewer than 11 tracers is FEW_TRACERS), "
                      "then for every tracer",
    "BAD_REDSHIFT": "a GALAXY whose redshift is unreliable (ZWARN != 0) or out of range (Z not finite or <= zmin): "
                    "not a tracer, every value NULL",
    "FEW_TRACERS": "the survey has fewer than MIN_TRACERS tracers: nothing computed, every value NULL",
    "NO_SKELETON": "the skeleton has no filament segment: Dist_Filament NULL",
    "COINCIDENT_NEIGHBOURS": "the N-th (or knn-th) neighbour is at distance 0 (duplicate positions): "
                             "infinite density, Sigma_N / Density_kNN3D NULL",
    "SPARSE": "fewer than min_kernel_tracers (default 2) tracers expected in the T-web's smoothing kernel at the "
              "galaxy's distance, n(r) x (2 pi)^1.5 x smoothing^3: the density field there is shot noise, "
              "Web_Class and Dist_Filament NULL (Sigma_N and Density_kNN3D are kept)",
    "TIDE_EDGE": "less than min_tide_coverage (default 0.3) of the ball of radius 4 x smoothing around the galaxy "
                 "lies inside the survey (footprint and redshift range): its tide comes mostly from unobserved "
                 "space, Web_Class NULL (Dist_Filament is kept unless FILAMENT_EDGE is set)",
    "FILAMENT_EDGE": "less than min_filament_coverage (default 0.3) of the ball reaching from the galaxy to its "
                     "nearest skeleton segment lies inside the survey: a nearer filament may lie in unobserved "
                     "space, so the distance is only an upper bound; Dist_Filament NULL",
}
#: Default of ``topology.min_kernel_tracers``. Subsampling the 100 deg^2 test mock (n(r) x kernel volume
#: 15 / 7.5 / 3.7 / 1.9 / 0.9 / 0.45) gives Web_Class accuracy 0.63 / 0.63 / 0.59 / 0.54 / 0.41 / 0.28, where
#: always answering the commonest class scores 0.43: below ~2 tracers per kernel the class is noise.
MIN_KERNEL_TRACERS = 2.0
#: Default of ``topology.min_tide_coverage``, and the ball's radius in smoothing lengths. Over ten mock
#: surveys (10-1000 deg^2), the 915 classed galaxies with less than 30 % of the 16 Mpc ball inside the survey
#: got 36.6 % of their classes right where a constant guess gets 59.5 % (bench/RESULTS.md, "Tide at the edge").
MIN_TIDE_COVERAGE = 0.3
TIDE_RADIUS_SMOOTHINGS = 4.0
#: Default of ``topology.min_filament_coverage``: Dist_Filament needs this much of the ball reaching to the
#: nearest segment inside the survey. Below it the nearest *observed* filament says little: the demo's
#: galaxies at z < 0.04 (a 5.5 deg cone, 5-16 Mpc across) read 63-177 Mpc, the distance to where the
#: skeleton begins (bench/RESULTS.md, "Filaments beyond the survey").
MIN_FILAMENT_COVERAGE = 0.3
#: Fewer tracers than this and the layer computes nothing (bit ``FEW_TRACERS``).
MIN_TRACERS = 11
_LAYER_OPTIONS = {
    "cosmology": str, "dv_kms": positive, "zmin": number(minimum=0.0), "knn": positive_integer,
    "radial_smoothing": positive, "min_kernel_tracers": number(minimum=0.0), "min_tide_coverage": fraction, "min_filament_coverage": fraction,
}


def _lambda_th(value: Any) -> float | tuple[float, float, float]:
    """One threshold, or three (for the sorted eigenvalues; their order is checked by ``WebOptions``)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ValueError("must be one number or a list of three")
        try:
            return tuple(number()(v) for v in value)  # type: ignore[return-value]
        except ValueError:
            raise ValueError("must be one number or a list of three numbers") from None
    try:
        return number()(value)
    except ValueError:
        raise ValueError("must be one number or a list of three numbers") from None


def _buffer(value: Any) -> float | None:
    """Buffer width in Mpc (>= 0), or null for the default."""
    return None if value is None else number(minimum=0.0)(value)


#: Checked converters of the T-web options (``cosmicweb.WebOptions``; a test keeps the two in step).
_WEB_OPTIONS = {
    "cell": positive, "smoothing": positive, "lambda_th": _lambda_th, "completeness_min": fraction,
    "nsigma": number(minimum=0.0), "core_cells": positive_integer, "buffer": _buffer, "workers": positive_integer,
    "subsample": positive_integer,
}
FILAMENTS_FILE = "filaments.parquet"
SETTINGS_FILE = "settings.json"


def filaments_path(ard_dir: Path | str) -> Path:
    """The skeleton table written by this layer."""
    return paths.artifact_dir(ard_dir, "topology") / FILAMENTS_FILE


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], cosmicweb.WebOptions]:
    """Layer options (cosmology, dv_kms, ...) and the T-web options, unknown keys rejected."""
    import difflib

    options = dict(options or {})
    known = sorted({**_LAYER_OPTIONS, **_WEB_OPTIONS})
    for key in options:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"topology layer: unknown option {key!r}"
                             + (f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(known)}"))
    given = parse_options("topology", options, {**_LAYER_OPTIONS, **_WEB_OPTIONS})
    mine = {k: v for k, v in given.items() if k in _LAYER_OPTIONS}
    try:
        web = cosmicweb.WebOptions.from_dict({k: v for k, v in given.items() if k not in _LAYER_OPTIONS})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"topology layer: {exc}") from None
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
    reliable_z: np.ndarray | None = None,
) -> TopologyResult:
    """The topology columns for every object.

    ``galaxy`` marks the galaxies (SPECTYPE GALAXY; the others get NULLs and
    ``NOT_GALAXY``); ``reliable_z`` (default: all) marks reliable redshifts
    (ZWARN == 0). The tracers, who get values, are the galaxies with a reliable,
    finite redshift above ``zmin``; the other galaxies get NULLs and
    ``BAD_REDSHIFT``. Every NULL carries a bit of :data:`FLAGS` saying why.
    """
    import time

    mine, web = split_options(options)
    cosmology = mine.get("cosmology", positions.DEFAULT_COSMOLOGY)
    ra, dec, z = (np.asarray(a, dtype=np.float64) for a in (ra, dec, z))
    is_galaxy = np.asarray(galaxy, bool)
    reliable = np.ones(len(z), bool) if reliable_z is None else np.asarray(reliable_z, bool)
    with np.errstate(invalid="ignore"):
        galaxy = is_galaxy & reliable & np.isfinite(z) & (z > mine.get("zmin", 0.01))
    n = len(z)
    flag = np.zeros(n, np.int32)
    flag[~is_galaxy] |= FLAGS["NOT_GALAXY"]
    flag[is_galaxy & ~galaxy] |= FLAGS["BAD_REDSHIFT"]
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
    settings["n_tracers"] = int(galaxy.sum())
    result = None
    if galaxy.sum() < MIN_TRACERS:
        flag[galaxy] |= FLAGS["FEW_TRACERS"]
    else:
        t0 = time.perf_counter()
        rg, dg, zg = ra[galaxy], dec[galaxy], z[galaxy]
        table = positions.distance_table(cosmology, z_max=max(6.0, float(np.ceil(zg.max()))))
        xyz = positions.cartesian(rg, dg, zg, cosmology)
        foot = density.Footprint.from_positions(rg, dg)
        distance = np.linalg.norm(xyz, axis=1)
        selection = density.SurveySelection.from_tracers(foot, distance, settings["radial_smoothing"])
        timings["positions_footprint_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dm = table.transverse_distance(zg)
        proj = density.projected_density(rg, dg, zg, dm, np.ones(len(zg), bool), n=(5, 10),
                                         dv_kms=settings["dv_kms"], workers=web.workers)
        edge = foot.edge_angle(rg, dg)
        r_k = density.knn_radius_3d(xyz, xyz, k=settings["knn"], self_in_tracers=np.ones(len(xyz), bool),
                                    workers=web.workers)
        knn[galaxy] = density.knn_density_from_radius(r_k, settings["knn"])
        sig[galaxy] = proj.sigma
        timings["sigma_n_knn_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = cosmicweb.survey_web(xyz, xyz, options=web, selection=selection)
        # expected tracers in the smoothing kernel at each galaxy's distance: below the threshold the
        # T-web classifies shot noise (see MIN_KERNEL_TRACERS)
        kernel_tracers = selection.radial(distance) * (2 * np.pi) ** 1.5 * web.smoothing**3
        sparse = kernel_tracers < float(mine.get("min_kernel_tracers", MIN_KERNEL_TRACERS))
        # the tide is non-local: where most of the ball around a galaxy is unobserved, the class is a guess
        min_cover = float(mine.get("min_tide_coverage", MIN_TIDE_COVERAGE))
        tide_edge = np.zeros(len(xyz), bool)
        if min_cover > 0:
            tide_edge = selection.ball_coverage(xyz, TIDE_RADIUS_SMOOTHINGS * web.smoothing, edge_angle=edge) < min_cover
        web_code[galaxy] = np.where(sparse | tide_edge, cosmicweb.MASKED_CODE, result.codes)
        timings["web_class_skeleton_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        has_skeleton = len(result.seg_start) > 0
        filament_edge = np.zeros(len(xyz), bool)
        if has_skeleton:
            d = skeleton.distance_to_segments(xyz, result.seg_start, result.seg_end, workers=web.workers)
            min_fil_cover = float(mine.get("min_filament_coverage", MIN_FILAMENT_COVERAGE))
            if min_fil_cover > 0:
                # a nearer filament could hide in unobserved space inside the ball out to the nearest segment
                filament_edge = ~sparse & (selection.ball_coverage(xyz, d, edge_angle=edge) < min_fil_cover)
            dist_fil[galaxy] = np.where(sparse | filament_edge, np.nan, d)
        timings["dist_filament_s"] = time.perf_counter() - t0
        g_flag = np.zeros(galaxy.sum(), np.int32)
        g_flag |= np.where(result.codes < 0, FLAGS["MASKED"], 0)
        g_flag |= np.where(np.nanmax(np.where(np.isfinite(proj.theta), proj.theta, 0), axis=1) > edge, FLAGS["EDGE"], 0)
        few = np.isnan(proj.d_n).any(axis=1) | np.isnan(r_k)
        g_flag |= np.where(few, FLAGS["FEW_NEIGHBOURS"], 0)
        coincident = (proj.d_n == 0).any(axis=1) | (r_k == 0)
        g_flag |= np.where(coincident, FLAGS["COINCIDENT_NEIGHBOURS"], 0)
        if not has_skeleton:
            g_flag |= FLAGS["NO_SKELETON"]
        g_flag |= np.where(sparse, FLAGS["SPARSE"], 0)
        g_flag |= np.where(tide_edge, FLAGS["TIDE_EDGE"], 0)
        g_flag |= np.where(filament_edge, FLAGS["FILAMENT_EDGE"], 0)
        flag[galaxy] |= g_flag
        settings.update({"footprint_nside": foot.nside, "footprint_area_deg2": round(foot.area_deg2, 3),
                         "n_subvolumes": result.n_subvolumes,
                         "kernel_tracers_median": round(float(np.median(kernel_tracers)), 3),
                         "sparse_fraction": round(float(sparse.mean()), 4),
                         "tide_edge_fraction": round(float(tide_edge.mean()), 4),
                         "filament_edge_fraction": round(float(filament_edge.mean()), 4),
                         "subvolume_shape": list(result.subvolume_shape), "n_filament_segments": int(len(result.seg_start))})
    return TopologyResult(web_code, dist_fil, sig, knn, flag, result, timings, settings)


class TopologyLayer:
    """Global layer computing the cosmic-web columns for every core row.

    :meth:`run_global` writes nothing: it keeps the run's skeleton and settings
    in memory until the orchestrator, once every partition is conformed and
    staged, asks for them with :meth:`stage_artifacts` and moves them into place
    last. A failed run therefore leaves the previous artifacts as they were.
    """

    name = "topology"
    version = "6"  # 3: BAD_REDSHIFT, FEW_TRACERS, NO_SKELETON, COINCIDENT_NEIGHBOURS flag bits; 4: SPARSE; 5: TIDE_EDGE; 6: FILAMENT_EDGE
    core_columns = ("ZWARN", "SPECTYPE")
    check_options = staticmethod(check_options)

    def __init__(self) -> None:
        self._artifacts: tuple[pa.Table, dict[str, Any]] | None = None

    def run_global(self, ard_dir: Path, core: pa.Table, options: dict[str, Any]) -> dict[int, pa.Table]:
        """Return, per partition pixel, TargetID + the topology columns (nothing is written)."""
        tid = core.column("TargetID").to_numpy()
        z = core.column("Z").to_numpy(zero_copy_only=False).astype(float)
        zwarn = core.column("ZWARN").fill_null(1).to_numpy()
        spectype = np.asarray(core.column("SPECTYPE").fill_null("").to_pylist(), dtype=object)
        res = compute(core.column("RA").to_numpy(), core.column("DEC").to_numpy(), z, spectype == "GALAXY", options,
                      reliable_z=zwarn == 0)
        # Written only by stage_artifacts, after the partitions: an empty skeleton when none was computed,
        # so a stale one from an earlier run never outlives the partitions it belonged to.
        self._artifacts = (filaments_table(res.web), res.settings)
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

    def stage_artifacts(self, ard_dir: Path | str, staging: Path | str) -> list[tuple[Path, Path]]:
        """Write the last run's skeleton and settings under ``staging``; return (staged, final) path pairs.

        The orchestrator calls this after every partition is staged and renames
        each staged file onto its final path last. Nothing is staged when
        :meth:`run_global` has not run.
        """
        if self._artifacts is None:
            return []
        table, settings = self._artifacts
        staging = Path(staging)
        staging.mkdir(parents=True, exist_ok=True)
        fil, sett = staging / FILAMENTS_FILE, staging / SETTINGS_FILE
        pq.write_table(table, fil)
        sett.write_text(json.dumps(settings, sort_keys=True, default=str))
        final = paths.artifact_dir(ard_dir, "topology")
        return [(fil, final / FILAMENTS_FILE), (sett, final / SETTINGS_FILE)]

    @staticmethod
    def finalize(ard_dir: Path | str, options: dict[str, Any]) -> dict[str, str]:
        """Cosmology and settings of the run, for ``ard_meta``."""
        path = paths.artifact_dir(ard_dir, "topology") / SETTINGS_FILE
        if not path.exists():
            return {}
        settings = json.loads(path.read_text())
        return {"topology_cosmology": str(settings.get("cosmology", "")),
                "topology_settings": json.dumps(settings, sort_keys=True, default=str)}


def filaments_table(result: cosmicweb.SurveyWeb | None) -> pa.Table:
    """The skeleton's segments as the ``filaments`` table (zero rows when there is no skeleton)."""
    if result is None:
        a = b = np.zeros((0, 3))
        persistence = np.zeros(0)
    else:
        a = np.asarray(result.seg_start, float).reshape(-1, 3)
        b = np.asarray(result.seg_end, float).reshape(-1, 3)
        persistence = np.asarray(result.persistence, float)
    return pa.table({
        "segment": pa.array(np.arange(len(a), dtype=np.int64)),
        "x0": pa.array(a[:, 0]), "y0": pa.array(a[:, 1]), "z0": pa.array(a[:, 2]),
        "x1": pa.array(b[:, 0]), "y1": pa.array(b[:, 1]), "z1": pa.array(b[:, 2]),
        "persistence_sigma": pa.array(persistence),
    })
