"""The topology layer (issue 8) against the mock survey's truth.

The science checks run on mock *catalogues* (``build_catalog``: the positions,
redshifts and truth of ``ard mock`` without the spectra, 2 s for 40 000
galaxies); the plumbing (NULLs and flags for stars and QSOs, the ``filaments``
view, ``ard_meta``) on a small full ``ard mock`` + ``ard build``.

Measured on the default check (100 deg^2, z < 0.15, 40 000 targets, seed 3,
the mock's cosmology): Web_Class accuracy 0.63 with the observed redshifts
(redshift space) and 0.715 with the true ones (real space); the issue's 70%
is reached in real space only: the mock's random velocities (rms ~5 Mpc along
the line of sight) cost ~0.09 (see build/layers/topology.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import median_abs_deviation, spearmanr

from ard_sql.build.layers import topology
from ard_sql.build.mock.field import observed_redshift
from ard_sql.build.mock.survey import MockConfig, build_catalog
from ard_sql.science import cosmicweb, density, positions, skeleton
from ard_sql.science.cosmicweb_synthetic import lognormal_catalog

MOCK_COSMOLOGY = "FlatLambdaCDM(H0=70, Om0=0.3)"
CHECK = dict(n=40000, seed=3, area=100.0, zmax=0.15)


@pytest.fixture(scope="module")
def check_mock(tmp_path_factory):
    return build_catalog(MockConfig(out=tmp_path_factory.mktemp("cat"), **CHECK))


@pytest.fixture(scope="module")
def check_catalog(check_mock):
    return check_mock[0]


@pytest.fixture(scope="module")
def observed(check_catalog):
    cat = check_catalog
    gal = cat["SPECTYPE"] == "GALAXY"
    return gal, topology.compute(cat["RA"], cat["DEC"], cat["Z_OBS"], gal, {"cosmology": MOCK_COSMOLOGY})


def test_web_class_confusion_matrix_redshift_space(check_catalog, observed) -> None:
    gal, res = observed
    cm = cosmicweb.confusion_matrix(check_catalog["WEB_CLASS"][gal], res.web_code[gal])
    acc = np.trace(cm) / cm.sum()
    print("confusion (rows truth Void..Knot, columns layer):\n", cm, "\naccuracy", acc)
    assert cm.sum() > 0.95 * gal.sum()  # almost nothing masked inside a 100 deg^2 cone
    assert acc > 0.60  # measured 0.629; the 0.70 is out of reach in redshift space on this mock
    # the errors are to neighbouring classes: Void is almost never taken for a Knot or vice versa
    assert cm[0, 3] + cm[3, 0] < 0.002 * cm.sum()
    assert all(cm[c, c] == cm[c].max() for c in range(4))


def test_web_class_accuracy_real_space_reaches_the_bar(check_catalog) -> None:
    cat = check_catalog
    gal = cat["SPECTYPE"] == "GALAXY"
    res = topology.compute(cat["RA"], cat["DEC"], cat["Z_COSMO"], gal, {"cosmology": MOCK_COSMOLOGY})
    cm = cosmicweb.confusion_matrix(cat["WEB_CLASS"][gal], res.web_code[gal])
    acc = np.trace(cm) / cm.sum()
    print("real-space confusion:\n", cm, "\naccuracy", acc)
    assert acc > 0.70  # measured 0.715


def test_neither_part_of_the_peculiar_velocity_alone_explains_the_gap(check_catalog, observed) -> None:
    """A perfect correction of either the coherent flows or the random motions would not reach 0.70.

    Measured (``bench/bench_topology_rsd.py``): observed 0.629, flows only 0.661, random only 0.650,
    real space 0.715: both parts cost accuracy and each alone leaves the bar out of reach.
    """
    cat = check_catalog
    gal, res_obs = observed
    z_cos, v, v_flow = cat["Z_COSMO"], cat["V_LOS"], cat["V_LOS_FLOW"]
    np.testing.assert_allclose(cat["Z_OBS"][gal], observed_redshift(z_cos, v)[gal], rtol=0, atol=1e-9)

    def accuracy(codes: np.ndarray) -> float:
        cm = cosmicweb.confusion_matrix(cat["WEB_CLASS"][gal], codes[gal])
        return np.trace(cm) / cm.sum()

    def classes(z: np.ndarray) -> np.ndarray:
        return topology.compute(cat["RA"], cat["DEC"], z, gal, {"cosmology": MOCK_COSMOLOGY}).web_code

    acc_obs = accuracy(res_obs.web_code)
    acc = {name: accuracy(classes(observed_redshift(z_cos, vv))) for name, vv in (("flows", v_flow), ("random", v - v_flow))}
    print("accuracy observed / flows only / random motions only:", acc_obs, acc)
    for value in acc.values():
        assert acc_obs + 0.01 < value < 0.70  # each part costs accuracy, and removing one alone is not enough


def test_filament_galaxies_lie_closer_to_the_skeleton_than_voids(check_catalog, observed) -> None:
    gal, res = observed
    truth = check_catalog["WEB_CLASS"]
    med = [np.nanmedian(res.dist_filament[gal & (truth == c)]) for c in range(4)]
    print("median Dist_Filament (Mpc) per true class Void..Knot:", med)  # measured 22.5, 15.3, 7.8, 5.3
    assert med[2] < 0.5 * med[0] and med[2] < med[1] and med[3] < med[1]
    assert res.settings["n_filament_segments"] > 100
    # NULL exactly where a nearer filament could lie outside the survey (FILAMENT_EDGE: 56 of 37,544 here)
    edge = (res.flag[gal] & topology.FLAGS["FILAMENT_EDGE"]) > 0
    assert (np.isfinite(res.dist_filament[gal]) == ~edge).all() and edge.mean() < 0.005
    assert not (res.flag & topology.FLAGS["NO_SKELETON"]).any()


def test_dist_filament_follows_the_true_skeleton(check_mock, observed) -> None:
    """Dist_Filament against the distance to the skeleton of the true field (same code, real space, no noise).

    Measured on this mock: Spearman 0.745, median 10.8 against 9.7 Mpc, log10((d + 1) / (d_true + 1))
    median +0.015 with scatter 0.128 dex, |d - d_true| median 2.1 Mpc (from real-space redshifts:
    0.813, +0.014, 0.077 dex, 1.2 Mpc; the rest is the redshift-space distortions).
    """
    from ard_sql.build.mock import field

    cat, web = check_mock
    gal, res = observed
    foot = density.Footprint.from_positions(cat["RA"][gal], cat["DEC"][gal])
    pos = np.stack([cat["X"], cat["Y"], cat["Z_COMOVING"]], axis=1)[gal]
    nbar = density.SurveySelection.from_tracers(foot, np.linalg.norm(pos, axis=1)).radial
    a, b = field.truth_skeleton(web, field.ConeGeometry(CHECK["area"], CHECK["zmax"]), nbar)
    d_true = skeleton.distance_to_segments(pos, a, b)
    d = res.dist_filament[gal]
    ok = np.isfinite(d) & np.isfinite(d_true)
    rho = spearmanr(d[ok], d_true[ok]).statistic
    lr = np.log10((d[ok] + 1) / (d_true[ok] + 1))
    bias, scatter = np.median(lr), median_abs_deviation(lr, scale="normal")
    print(f"Dist_Filament vs truth skeleton ({len(a)} segments): Spearman {rho:.3f}, bias {bias:+.3f} dex, "
          f"scatter {scatter:.3f} dex, |d - d_true| median {np.median(np.abs(d[ok] - d_true[ok])):.1f} Mpc")
    assert ok.mean() > 0.99 and len(a) > 100
    assert rho > 0.7 and abs(bias) < 0.05 and scatter < 0.16


def test_galaxies_whose_tide_lies_mostly_outside_get_no_web_class(check_catalog, observed) -> None:
    """TIDE_EDGE: less than 30 % of the 16 Mpc ball inside the survey. Measured here: 502 galaxies flagged,
    295 of them in unmasked cells (0.8 % of those classed), right 38.6 % of the time against 63.1 %."""
    cat = check_catalog
    gal, res = observed
    off = topology.compute(cat["RA"], cat["DEC"], cat["Z_OBS"], gal,
                           {"cosmology": MOCK_COSMOLOGY, "min_tide_coverage": 0.0})
    edge = gal & ((res.flag & topology.FLAGS["TIDE_EDGE"]) > 0)
    assert not (off.flag & topology.FLAGS["TIDE_EDGE"]).any()
    assert 50 < edge.sum() < 0.02 * gal.sum()
    # Dist_Filament is kept unless the ball out to the nearest segment is itself mostly outside (FILAMENT_EDGE)
    fil_edge = (res.flag[edge] & topology.FLAGS["FILAMENT_EDGE"]) > 0
    assert (res.web_code[edge] == cosmicweb.MASKED_CODE).all() and (np.isfinite(res.dist_filament[edge]) == ~fil_edge).all()
    np.testing.assert_array_equal(res.web_code[gal & ~edge], off.web_code[gal & ~edge])
    truth = cat["WEB_CLASS"]
    classed = off.web_code >= 0  # the rest of the flagged are masked cells anyway
    acc_edge, acc_rest = (np.mean(off.web_code[m] == truth[m]) for m in (edge & classed, gal & ~edge & classed))
    print(f"TIDE_EDGE: {edge.sum()} galaxies ({(edge & classed).sum()} not masked), accuracy {acc_edge:.3f} (others {acc_rest:.3f})")
    assert acc_edge < acc_rest - 0.15


def test_ball_coverage_of_a_cone() -> None:
    """Deep inside: 1; at the far end: about half; in a 2-degree cone at 200 Mpc (7 Mpc across): a
    small share; and skipping the positions far from every edge changes nothing."""
    rng = np.random.default_rng(1)
    ra, dec = rng.uniform(170, 190, 40000), rng.uniform(-10, 10, 40000)
    wide = density.SurveySelection.from_tracers(density.Footprint.from_positions(ra, dec), rng.uniform(100, 600, 40000))
    narrow_ra, narrow_dec = rng.uniform(179, 181, 40000), rng.uniform(-1, 1, 40000)
    narrow = density.SurveySelection.from_tracers(density.Footprint.from_positions(narrow_ra, narrow_dec),
                                                  rng.uniform(100, 600, 40000))
    axis = positions.unit_vectors(np.array([180.0]), np.array([0.0]))[0]
    deep, far, side = wide.ball_coverage(np.stack([350 * axis, 600 * axis, 350 * positions.unit_vectors(
        np.array([170.0]), np.array([0.0]))[0]]), 16.0)
    assert deep == 1.0 and 0.35 < far < 0.65 and 0.3 < side < 0.7
    in_narrow = narrow.ball_coverage((200 * axis)[None], 16.0)[0]
    assert 0.03 < in_narrow < 0.3  # ~ (7 Mpc)^2 x 32 Mpc of a 17,000 Mpc^3 ball
    # the skip rule: every position, near an edge or not, gets what the full computation gives
    pts = positions.unit_vectors(ra[:3000], dec[:3000]) * rng.uniform(100, 600, 3000)[:, None]
    full = wide.ball_coverage(pts, 16.0)
    skipped = wide.ball_coverage(pts, 16.0, edge_angle=wide.footprint.edge_angle(ra[:3000], dec[:3000]))
    assert (full < 1).sum() > 300
    np.testing.assert_array_equal(skipped, full)


def test_sigma5_and_knn_follow_the_true_density(check_catalog, observed) -> None:
    gal, res = observed
    delta = check_catalog["DELTA"]
    rho = {}
    for name, est in (("Sigma_5", res.sigma[:, 0]), ("Sigma_10", res.sigma[:, 1]), ("kNN", res.knn)):
        ok = gal & np.isfinite(est) & (est > 0)
        rho[name] = spearmanr(est[ok], delta[ok]).statistic
        # Scatter (dex) of log density about its mean relation with log(1 + DELTA): how well one
        # galaxy's value places it, beyond the rank order.
        x, y = np.log10(1 + delta[ok]), np.log10(est[ok])
        slope, icpt = np.polyfit(x, y, 1)
        resid = y - (slope * x + icpt)
        print(f"{name}: Spearman vs DELTA {rho[name]:.3f}, slope {slope:.2f}, "
              f"scatter {median_abs_deviation(resid, scale='normal'):.3f} dex, n {ok.sum()}")
    assert rho["Sigma_5"] > 0.7 and rho["Sigma_10"] > 0.7 and rho["kNN"] > 0.75


def test_shuffled_randoms_would_cancel_the_radial_signal(check_catalog) -> None:
    """Why the layer uses a smoothed n(r) selection function and not randoms with the tracers' redshifts."""
    cat = check_catalog
    gal = cat["SPECTYPE"] == "GALAXY"
    ra, dec, z = cat["RA"][gal], cat["DEC"][gal], cat["Z_OBS"][gal]
    xyz = positions.cartesian(ra, dec, z, MOCK_COSMOLOGY)
    foot = density.Footprint.from_positions(ra, dec)
    opt = cosmicweb.WebOptions(nsigma=1e9)
    rng = np.random.default_rng(0)
    rra, rdec = foot.sample(10 * len(z), rng)
    shuffled = positions.cartesian(rra, rdec, rng.choice(z, 10 * len(z)), MOCK_COSMOLOGY)
    with_randoms = cosmicweb.survey_web(xyz, xyz, shuffled, foot.sky_fraction, opt)
    sel = density.SurveySelection.from_tracers(foot, np.linalg.norm(xyz, axis=1))
    with_selection = cosmicweb.survey_web(xyz, xyz, options=opt, selection=sel)
    truth = cat["DELTA"][gal]
    r_rand = spearmanr(with_randoms.delta, truth, nan_policy="omit").statistic
    r_sel = spearmanr(with_selection.delta, truth, nan_policy="omit").statistic
    assert r_sel > r_rand + 0.03, (r_sel, r_rand)


def test_decomposed_run_equals_single_volume() -> None:
    cat = lognormal_catalog(60000, 240.0, grid=96, seed=5)
    pts = cat.points + np.array([300.0, -120.0, -120.0])  # observer outside, at the origin
    r = np.linalg.norm(pts, axis=1)
    # selection: uniform density inside the box; randoms make the comparison independent of healpix
    rng = np.random.default_rng(1)
    randoms = rng.random((5 * len(pts), 3)) * 240.0 + np.array([300.0, -120.0, -120.0])
    frac = 1.0  # randoms' radial density is normalised per shell and sky fraction; any constant works for both runs
    opt_big = cosmicweb.WebOptions(cell=4.0, smoothing=5.0, nsigma=3.0, core_cells=1000)
    opt_small = cosmicweb.WebOptions(cell=4.0, smoothing=5.0, nsigma=3.0, core_cells=24)
    single = cosmicweb.survey_web(pts, pts, randoms, frac, opt_big)
    split = cosmicweb.survey_web(pts, pts, randoms, frac, opt_small)
    assert single.n_subvolumes == 1 and split.n_subvolumes >= 8
    assert np.prod(split.subvolume_shape) < 0.5 * np.prod(single.subvolume_shape)
    ok = (single.codes >= 0) & (split.codes >= 0)
    assert ok.mean() > 0.9 and np.array_equal(single.codes >= 0, split.codes >= 0)
    err = np.abs(single.eigenvalues - split.eigenvalues).max(axis=1) / np.nanstd(single.eigenvalues)
    from_edge = np.min(np.minimum(cat.points, 240.0 - cat.points), axis=1)
    inner = ok & (from_edge > 30.0)
    agree = (single.codes[ok] == split.codes[ok]).mean()
    agree_inner = (single.codes[inner] == split.codes[inner]).mean()
    print("class agreement", agree, "inner", agree_inner, "median / p99 |d lambda| / std", np.median(err[ok]),
          np.percentile(err[inner], 99))
    # measured: 0.974 overall, 0.986 more than 30 Mpc inside; median error 1.4%; the rest is the
    # survey edge, where the coarse long-range grid sees the mask at 8 Mpc resolution
    assert agree > 0.96 and agree_inner > 0.98
    assert np.median(err[ok]) < 0.03 and np.percentile(err[inner], 99) < 0.1
    np.testing.assert_allclose(split.delta[ok], single.delta[ok], atol=1e-4)
    # the skeleton: decomposed segments lie on the single-volume skeleton
    from ard_sql.science.skeleton import distance_to_segments

    mid = 0.5 * (split.seg_start + split.seg_end)
    d = distance_to_segments(mid, single.seg_start, single.seg_end)
    assert np.mean(d < 1e-6) > 0.85 and len(split.seg_start) > 0.8 * len(single.seg_start)  # measured 0.89
    del r


# ---------------------------------------------------------------- the layer in a build
@pytest.fixture(scope="module")
def small_ard(tmp_path_factory) -> tuple[Path, Path]:
    from ard_sql.build.mock.survey import run_mock
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    root = tmp_path_factory.mktemp("topo")
    mock = root / "mock"
    run_mock(MockConfig(out=mock, n=300, seed=3, area=20.0, zmax=0.15, max_cells=2**19, truth_spectra=False))
    out = root / "ard"
    report = build(BuildOptions(source=str(mock), out=str(out), layers=["topology"], scheduler="sync", progress=False,
                                # 300 targets are sparse everywhere (bit SPARSE, tested on the dense catalogue):
                                # the check is off here so that the build's plumbing is tested with classes
                                layer_options={"topology": {"cosmology": MOCK_COSMOLOGY, "min_kernel_tracers": 0}}))
    assert not report.errors, report.errors
    return mock, out


def test_layer_columns_flags_and_filaments_view(small_ard) -> None:
    import ard_sql

    mock, out = small_ard
    db = ard_sql.open(out)
    db.execute(f"CREATE TEMP VIEW truth AS SELECT * FROM read_parquet('{mock}/truth.parquet')")
    df = db.sql("SELECT a.TargetID, a.Web_Class, a.Web_Class_Code, a.Dist_Filament, a.Sigma_5, a.Sigma_10, "
                "a.Density_kNN3D, a.Topology_flag, t.SPECTYPE FROM ard a JOIN truth t ON a.TargetID = t.TARGETID").df()
    assert len(df) == 300
    other = df[df.SPECTYPE != "GALAXY"]
    assert len(other) > 0
    for col in ("Web_Class", "Web_Class_Code", "Dist_Filament", "Sigma_5", "Sigma_10", "Density_kNN3D"):
        assert other[col].isna().all(), col
    assert (other.Topology_flag & topology.FLAGS["NOT_GALAXY"]).all()
    gal = df[df.SPECTYPE == "GALAXY"]
    assert gal.Web_Class_Code.notna().mean() > 0.8 and gal.Sigma_5.notna().mean() > 0.9
    assert set(gal.Web_Class.dropna()) <= {"Void", "Sheet", "Filament", "Knot"}
    # a true galaxy that redrock did not call GALAXY is no tracer (NOT_GALAXY), nor one with ZWARN != 0
    # (BAD_REDSHIFT); every other NULL class is a masked cell, or the tide's ball is mostly outside
    no_tracer = topology.FLAGS["NOT_GALAXY"] | topology.FLAGS["BAD_REDSHIFT"]
    masked = gal[gal.Web_Class_Code.isna() & ((gal.Topology_flag & no_tracer) == 0)]
    assert (masked.Topology_flag & (topology.FLAGS["MASKED"] | topology.FLAGS["TIDE_EDGE"])).all()
    # Web_Class compares with names and codes alike
    n_name = db.sql("SELECT count(*) FROM ard WHERE Web_Class = 'Filament'").fetchall()[0][0]
    n_code = db.sql("SELECT count(*) FROM ard WHERE Web_Class_Code = 2").fetchall()[0][0]
    assert n_name == n_code > 0
    seg = db.sql("SELECT count(*), min(persistence_sigma) FROM filaments").fetchall()[0]
    assert seg[0] > 0 and seg[1] >= 3.0
    assert pq.read_table(topology.filaments_path(out)).num_rows == seg[0]
    meta = dict(db.sql("SELECT name, value FROM ard_meta WHERE name LIKE 'topology%'").fetchall())
    assert meta.get("topology_cosmology") == MOCK_COSMOLOGY


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="did you mean 'smoothing'"):
        topology.split_options({"smoothin": 4})
    with pytest.raises(ValueError, match="unknown cosmology"):
        positions.get_cosmology("Planck2099")


# ---------------------------------------------------------------- every NULL has a flag
_NO_VALUES = ("NOT_GALAXY", "BAD_REDSHIFT", "FEW_TRACERS")


def _bits(*names: str) -> int:
    return int(np.bitwise_or.reduce([topology.FLAGS[n] for n in names]))


def _assert_every_null_explained(res: topology.TopologyResult) -> None:
    """Each NULL value carries a bit that says why (the project's rule: no silent NULL)."""
    why = {
        "Web_Class": (res.web_code < 0, _bits(*_NO_VALUES, "MASKED", "SPARSE", "TIDE_EDGE")),
        "Dist_Filament": (~np.isfinite(res.dist_filament), _bits(*_NO_VALUES, "NO_SKELETON", "SPARSE", "FILAMENT_EDGE")),
        "Sigma_5": (~np.isfinite(res.sigma[:, 0]), _bits(*_NO_VALUES, "FEW_NEIGHBOURS", "COINCIDENT_NEIGHBOURS")),
        "Sigma_10": (~np.isfinite(res.sigma[:, 1]), _bits(*_NO_VALUES, "FEW_NEIGHBOURS", "COINCIDENT_NEIGHBOURS")),
        "Density_kNN3D": (~np.isfinite(res.knn), _bits(*_NO_VALUES, "FEW_NEIGHBOURS", "COINCIDENT_NEIGHBOURS")),
    }
    for col, (null, bits) in why.items():
        silent = np.flatnonzero(null & ((res.flag & bits) == 0))
        assert silent.size == 0, f"{col}: {silent.size} NULL values without a flag, e.g. rows {silent[:5]}"


def _field(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform random galaxies in a 5 x 4 deg field at 0.02 < z < 0.12."""
    rng = np.random.default_rng(seed)
    return rng.uniform(150, 155, n), rng.uniform(0, 4, n), rng.uniform(0.02, 0.12, n)


def test_flag_bits_are_distinct_stable_and_documented() -> None:
    from ard_sql import contract

    bits = topology.FLAGS
    assert {k: bits[k] for k in ("NOT_GALAXY", "MASKED", "EDGE", "FEW_NEIGHBOURS")} == {
        "NOT_GALAXY": 1, "MASKED": 2, "EDGE": 4, "FEW_NEIGHBOURS": 8}  # stored values never change meaning
    assert len(set(bits.values())) == len(bits) and all(v & (v - 1) == 0 for v in bits.values())
    assert set(topology.FLAG_MEANINGS) == set(bits)
    desc = {c.name: c.description for c in contract.TOPOLOGY_COLUMNS}["Topology_flag"]
    for value in bits.values():
        assert f" {value} " in desc, value
    for name in bits:
        assert name in (topology.__doc__ or ""), name


def test_too_few_tracers_flags_every_tracer() -> None:
    ra, dec, z = _field(13)
    galaxy = np.ones(13, bool)
    galaxy[-3:] = False  # 10 tracers, 3 stars
    res = topology.compute(ra, dec, z, galaxy)
    assert (res.flag[:10] == topology.FLAGS["FEW_TRACERS"]).all()
    assert (res.flag[10:] == topology.FLAGS["NOT_GALAXY"]).all()
    assert np.isnan(res.knn).all() and np.isnan(res.sigma).all() and np.isnan(res.dist_filament).all()
    assert (res.web_code < 0).all() and res.settings["n_tracers"] == 10 and res.web is None
    _assert_every_null_explained(res)
    # one more tracer and the layer computes: the bit is gone
    res11 = topology.compute(*_field(11), np.ones(11, bool))
    assert not (res11.flag & topology.FLAGS["FEW_TRACERS"]).any() and np.isfinite(res11.knn).all()


def test_unreliable_or_out_of_range_redshift_is_not_called_not_galaxy() -> None:
    n = 300
    ra, dec, z = _field(n, seed=1)
    galaxy = np.ones(n, bool)
    reliable = np.ones(n, bool)
    reliable[0] = False  # ZWARN != 0
    z[1] = 0.005  # <= zmin
    z[2] = np.nan
    galaxy[3] = False  # a star (reliable, tiny z)
    z[3] = 0.0001
    galaxy[4] = False  # a QSO with an unreliable redshift: NOT_GALAXY says enough
    reliable[4] = False
    res = topology.compute(ra, dec, z, galaxy, reliable_z=reliable)
    bad, not_gal = topology.FLAGS["BAD_REDSHIFT"], topology.FLAGS["NOT_GALAXY"]
    assert (res.flag[:3] == bad).all(), res.flag[:3]
    assert (res.flag[3:5] == not_gal).all(), res.flag[3:5]
    assert not (res.flag[5:] & (bad | not_gal)).any()
    assert np.isnan(res.knn[:5]).all() and np.isfinite(res.knn[5:]).all()
    assert res.settings["n_tracers"] == n - 5
    _assert_every_null_explained(res)


def test_layer_reads_zwarn_and_spectype_into_the_flags(tmp_path) -> None:
    import pyarrow as pa

    n = 200
    ra, dec, z = _field(n, seed=2)
    zwarn = np.zeros(n, np.int64)
    zwarn[:4] = 4
    spectype = ["GALAXY"] * n
    spectype[4], spectype[5] = "STAR", "QSO"
    core = pa.table({"TargetID": np.arange(n, dtype=np.int64), "RA": ra, "DEC": dec, "Z": z,
                     "ZWARN": pa.array(list(zwarn[:-1]) + [None], pa.int64()), "SPECTYPE": spectype,
                     "Npix": np.where(np.arange(n) < n // 2, 7, 9).astype(np.int64)})
    layer = topology.TopologyLayer()
    out = layer.run_global(tmp_path, core, {})
    assert list(tmp_path.iterdir()) == []  # run_global writes nothing: the orchestrator places the files
    flag = np.concatenate([out[7].column("Topology_flag").to_numpy(), out[9].column("Topology_flag").to_numpy()])
    bad, not_gal = topology.FLAGS["BAD_REDSHIFT"], topology.FLAGS["NOT_GALAXY"]
    assert (flag[[0, 1, 2, 3, n - 1]] == bad).all()  # ZWARN != 0 and a NULL ZWARN
    assert (flag[[4, 5]] == not_gal).all()
    staged = layer.stage_artifacts(tmp_path, tmp_path / "stage")
    assert {final.name for _, final in staged} == {topology.FILAMENTS_FILE, topology.SETTINGS_FILE}
    assert all(s.exists() and not f.exists() for s, f in staged)
    assert pq.read_table(staged[0][0]).column_names[:2] == ["segment", "x0"]


def test_no_skeleton_flags_dist_filament() -> None:
    ra, dec, z = _field(300, seed=3)
    res = topology.compute(ra, dec, z, np.ones(300, bool), {"nsigma": 1e9})  # no filament that significant
    assert res.settings["n_filament_segments"] == 0
    assert np.isnan(res.dist_filament).all()
    assert (res.flag & topology.FLAGS["NO_SKELETON"]).all()
    assert np.isfinite(res.knn).all()  # the other columns stand
    _assert_every_null_explained(res)
    assert topology.filaments_table(res.web).num_rows == 0


def test_coincident_neighbours_give_null_density_with_a_flag() -> None:
    n = 400
    ra, dec, z = _field(n, seed=4)
    ra[-6:], dec[-6:], z[-6:] = ra[0], dec[0], z[0]  # 7 galaxies at one position: r_5 = d_5 = 0
    res = topology.compute(ra, dec, z, np.ones(n, bool))
    dup = np.r_[0, np.arange(n - 6, n)]
    co = topology.FLAGS["COINCIDENT_NEIGHBOURS"]
    assert (res.flag[dup] & co).all()
    assert np.isnan(res.knn[dup]).all() and np.isnan(res.sigma[dup, 0]).all()
    assert np.isfinite(res.sigma[dup, 1]).all()  # the 10th neighbour is elsewhere: Sigma_10 stands
    assert not (res.flag[dup] & topology.FLAGS["FEW_NEIGHBOURS"]).any()  # neighbours there are, at distance 0
    others = np.setdiff1d(np.arange(n), dup)
    assert not (res.flag[others] & co).any()
    assert np.isfinite(res.knn).sum() == n - dup.size and not np.isinf(res.knn).any() and not np.isinf(res.sigma).any()
    _assert_every_null_explained(res)


def test_few_neighbours_says_which_density_is_null() -> None:
    """FEW_NEIGHBOURS as documented: < 10 tracers in the velocity window -> Sigma_10 NULL, < 5 -> Sigma_5 too;
    Density_kNN3D stays (it is NULL by this bit only with no more than knn tracers in the survey)."""
    ra, dec, z = _field(300, seed=6)  # z < 0.12
    rng = np.random.default_rng(6)
    # two groups alone in redshift (> 3000 km/s from the field and from each other), 150 km/s deep:
    # 7 galaxies (6 neighbours each: Sigma_5 yes, Sigma_10 no) and 3 (2 neighbours: neither)
    groups = [(0.135, 7), (0.15, 3)]
    for zc, n in groups:
        ra = np.r_[ra, rng.uniform(151, 154, n)]
        dec = np.r_[dec, rng.uniform(1, 3, n)]
        z = np.r_[z, zc + rng.uniform(-2.5e-4, 2.5e-4, n)]
    res = topology.compute(ra, dec, z, np.ones(z.size, bool))
    few = (res.flag & topology.FLAGS["FEW_NEIGHBOURS"]) > 0
    s5, s10 = np.isfinite(res.sigma[:, 0]), np.isfinite(res.sigma[:, 1])
    seven, three = np.arange(300, 307), np.arange(307, 310)
    assert few[seven].all() and s5[seven].all() and not s10[seven].any()
    assert few[three].all() and not s5[three].any() and not s10[three].any()
    assert np.isfinite(res.knn).all()  # 310 tracers > knn: never NULL here
    # the bit is exactly "Sigma_10 NULL" (no coincident neighbours here), and Sigma_5 NULL implies Sigma_10 NULL
    assert not (res.flag & topology.FLAGS["COINCIDENT_NEIGHBOURS"]).any()
    np.testing.assert_array_equal(few, ~s10)
    assert not (~s5 & s10).any()
    _assert_every_null_explained(res)
    meaning = topology.FLAG_MEANINGS["FEW_NEIGHBOURS"]  # the documented meaning names each column it NULLs
    assert all(col in meaning for col in ("Sigma_5", "Sigma_10", "Density_kNN3D")), meaning


def test_few_neighbours_with_no_more_than_knn_tracers_nulls_only_the_knn_density() -> None:
    """knn >= the survey's tracers: Density_kNN3D NULL with FEW_NEIGHBOURS for every tracer, the Sigma_N kept."""
    rng = np.random.default_rng(7)
    n = 15  # >= MIN_TRACERS, all within +-150 km/s: 14 neighbours each in the velocity window
    ra, dec, z = rng.uniform(150, 152, n), rng.uniform(0, 2, n), 0.05 + rng.uniform(-2.5e-4, 2.5e-4, n)
    res = topology.compute(ra, dec, z, np.ones(n, bool), {"knn": 20})
    assert (res.flag & topology.FLAGS["FEW_NEIGHBOURS"]).all()
    assert np.isnan(res.knn).all() and np.isfinite(res.sigma).all()
    _assert_every_null_explained(res)
    # with the default knn (5) no density is NULL and the bit is clear
    res5 = topology.compute(ra, dec, z, np.ones(n, bool))
    assert np.isfinite(res5.knn).all() and not (res5.flag & topology.FLAGS["FEW_NEIGHBOURS"]).any()


def test_knn_density_is_nan_never_inf_for_coincident_tracers() -> None:
    pts = np.random.default_rng(5).uniform(0, 10, (50, 3))
    pts[1:4] = pts[0]  # 4 coincident: the 3rd neighbour of each is at distance 0
    r = density.knn_radius_3d(pts, pts, k=3, self_in_tracers=np.ones(50, bool))
    dens = density.knn_density_3d(pts, pts, k=3, self_in_tracers=np.ones(50, bool))
    assert (r[:4] == 0).all() and (r[4:] > 0).all()
    assert np.isnan(dens[:4]).all() and np.isfinite(dens[4:]).all()
    np.testing.assert_allclose(dens[4:], 3 / (4 / 3 * np.pi * r[4:] ** 3))


# ---------------------------------------------------------------- a failed global run keeps the previous one
def _snapshot(ard: Path) -> dict[str, bytes]:
    files = list((ard / "staging" / "topology").rglob("*.parquet")) + list((ard / "artifacts" / "topology").iterdir())
    files.append(ard / "state" / "topology.json")
    return {str(f.relative_to(ard)): f.read_bytes() for f in files}


def test_failed_global_run_keeps_previous_partitions_and_artifacts(small_ard, tmp_path, monkeypatch) -> None:
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    mock, _ = small_ard
    ard = tmp_path / "ard"
    first = build(BuildOptions(source=str(mock), out=str(ard), order=5, layers=["topology"], scheduler="sync",
                               progress=False, layer_options={"topology": {"cosmology": MOCK_COSMOLOGY}}))
    assert not first.errors, first.errors
    pixels = sorted(int(f.stem.split("=")[1]) for f in (ard / "staging" / "topology" / "dataset").rglob("Npix=*.parquet"))
    assert len(pixels) >= 2  # a failure at the last pixel would leave the earlier ones rewritten
    before = _snapshot(ard)
    assert any(k.endswith(topology.FILAMENTS_FILE) for k in before) and any(k.endswith(topology.SETTINGS_FILE) for k in before)

    original = topology.TopologyLayer.run_global

    def broken(self, ard_dir, core, options):
        out = original(self, ard_dir, core, options)
        out[pixels[-1]] = out[pixels[-1]].drop(["Sigma_5"])  # invalid for one pixel only
        return out

    monkeypatch.setattr(topology.TopologyLayer, "run_global", broken)
    # another cosmology: every value, the skeleton and the settings would differ from the built ones
    opts = dict(out=str(ard), layers=["topology"], scheduler="sync", progress=False,
                layer_options={"topology": {"cosmology": "Planck18"}})
    report = build(BuildOptions(**opts))
    assert [p.layer for p in report.errors] == ["topology"], report.errors
    assert "Sigma_5" in report.errors[0].reason and f"pixel {pixels[-1]}" in report.errors[0].reason
    assert _snapshot(ard) == before
    assert not list(ard.glob(".topology-staging-*"))

    # the same build without the fault replaces every partition and the artifacts together
    monkeypatch.setattr(topology.TopologyLayer, "run_global", original)
    report = build(BuildOptions(**opts))
    assert not report.errors, report.errors
    after = _snapshot(ard)
    assert after.keys() >= before.keys()
    changed = {k for k in before if after.get(k) != before[k]}
    for k in before:
        if "Npix=" in k or k.endswith((topology.FILAMENTS_FILE, topology.SETTINGS_FILE)):
            assert k in changed, k
    assert not list(ard.glob(".topology-staging-*"))


# ---------------------------------------------------------------- slower, wider check
@pytest.mark.slow
def test_web_class_on_a_wide_mock(tmp_path) -> None:
    """1000 deg^2, z < 0.1, 100 000 targets: redshift-space accuracy 0.658 measured."""
    cat, _ = build_catalog(MockConfig(out=tmp_path, n=100000, seed=3, area=1000.0, zmax=0.1))
    gal = cat["SPECTYPE"] == "GALAXY"
    res = topology.compute(cat["RA"], cat["DEC"], cat["Z_OBS"], gal, {"cosmology": MOCK_COSMOLOGY})
    cm = cosmicweb.confusion_matrix(cat["WEB_CLASS"][gal], res.web_code[gal])
    acc = np.trace(cm) / cm.sum()
    print(cm, acc)
    assert acc > 0.64
    truth = cat["WEB_CLASS"]
    med = [np.nanmedian(res.dist_filament[gal & (truth == c)]) for c in range(4)]
    assert med[2] < 0.5 * med[0]


def test_a_sparse_sample_gets_no_web_class(check_catalog, observed) -> None:
    """Below ~2 tracers per smoothing kernel the T-web classifies shot noise: NULL + SPARSE, not a class.

    Subsampling this mock to 3 % (0.45 tracers per kernel) gave 28 % accuracy, below the 43 % of always
    answering the commonest class; the full mock (~15 per kernel) is almost never sparse.
    """
    cat = check_catalog
    gal, res = observed
    assert np.mean(res.flag[gal] & topology.FLAGS["SPARSE"] > 0) < 0.05
    keep = np.zeros(len(gal), bool)
    keep[np.random.default_rng(0).choice(np.flatnonzero(gal), int(0.03 * gal.sum()), replace=False)] = True
    sub = topology.compute(cat["RA"][keep], cat["DEC"][keep], cat["Z_OBS"][keep], gal[keep], {"cosmology": MOCK_COSMOLOGY})
    sparse = (sub.flag & topology.FLAGS["SPARSE"]) > 0
    assert sparse.mean() > 0.95
    assert np.all(sub.web_code[sparse] == cosmicweb.MASKED_CODE) and np.all(np.isnan(sub.dist_filament[sparse]))
    assert np.isfinite(sub.sigma[sparse, 0]).mean() > 0.9  # the projected densities are still given
    # the threshold is an option: 0 turns the check off
    off = topology.compute(cat["RA"][keep], cat["DEC"][keep], cat["Z_OBS"][keep], gal[keep],
                           {"cosmology": MOCK_COSMOLOGY, "min_kernel_tracers": 0})
    assert not np.any(off.flag & topology.FLAGS["SPARSE"])
