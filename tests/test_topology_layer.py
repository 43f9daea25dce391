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
from scipy.stats import spearmanr

from ard_sql.build.layers import topology
from ard_sql.build.mock.field import observed_redshift
from ard_sql.build.mock.survey import MockConfig, build_catalog
from ard_sql.science import cosmicweb, density, positions
from ard_sql.science.cosmicweb_synthetic import lognormal_catalog

MOCK_COSMOLOGY = "FlatLambdaCDM(H0=70, Om0=0.3)"
CHECK = dict(n=40000, seed=3, area=100.0, zmax=0.15)


@pytest.fixture(scope="module")
def check_catalog(tmp_path_factory):
    cat, _ = build_catalog(MockConfig(out=tmp_path_factory.mktemp("cat"), **CHECK))
    return cat


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
    assert np.isfinite(res.dist_filament[gal]).all()


def test_sigma5_and_knn_follow_the_true_density(check_catalog, observed) -> None:
    gal, res = observed
    delta = check_catalog["DELTA"]
    ok = gal & np.isfinite(res.sigma[:, 0])
    rho5 = spearmanr(res.sigma[ok, 0], delta[ok]).statistic
    ok_k = gal & np.isfinite(res.knn)
    rho_k = spearmanr(res.knn[ok_k], delta[ok_k]).statistic
    print("Spearman Sigma_5 vs DELTA", rho5, "kNN", rho_k)  # measured 0.76, 0.80
    assert rho5 > 0.7 and rho_k > 0.75


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
                                layer_options={"topology": {"cosmology": MOCK_COSMOLOGY}}))
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
    # a true galaxy that redrock did not call GALAXY with ZWARN == 0 is no tracer (NOT_GALAXY);
    # every other NULL class is a masked cell
    masked = gal[gal.Web_Class_Code.isna() & ((gal.Topology_flag & topology.FLAGS["NOT_GALAXY"]) == 0)]
    assert (masked.Topology_flag & topology.FLAGS["MASKED"]).all()
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
