"""Positions (interpolated distances), Sigma_N, 3-D kNN density and the footprint flag."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.cosmology import WMAP9, Planck18

from ard_sql.science.density import Footprint, knn_density_3d, projected_density
from ard_sql.science.positions import (
    C_KMS,
    cartesian,
    comoving_distance,
    cosmology_name,
    distance_table,
    get_cosmology,
)


@pytest.mark.parametrize("cosmo", [Planck18, WMAP9], ids=["Planck18", "WMAP9"])
def test_positions_match_astropy_direct(cosmo) -> None:
    rng = np.random.default_rng(0)
    ra, dec, z = rng.uniform(0, 360, 2000), rng.uniform(-80, 80, 2000), rng.uniform(0.001, 3.5, 2000)
    xyz = cartesian(ra, dec, z, cosmology=cosmo)
    ref = cosmo.comoving_transverse_distance(z).to_value(u.Mpc)
    np.testing.assert_allclose(np.linalg.norm(xyz, axis=1), ref, rtol=1e-7)
    c = u.Quantity(ref, u.Mpc)
    from astropy.coordinates import SkyCoord

    sc = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, distance=c, frame="icrs").cartesian
    np.testing.assert_allclose(xyz, np.stack([sc.x.value, sc.y.value, sc.z.value], axis=1), atol=1e-6 * ref.max())


def test_positions_invalid_redshift_is_nan_and_names() -> None:
    d = comoving_distance(np.array([-0.1, np.nan, 0.5]))
    assert np.isnan(d[0]) and np.isnan(d[1]) and d[2] == pytest.approx(Planck18.comoving_distance(0.5).value, rel=1e-7)
    assert cosmology_name() == "Planck18" and cosmology_name("WMAP9") == "WMAP9"
    assert distance_table() is distance_table()  # built once
    with pytest.raises(ValueError, match="unknown cosmology"):
        get_cosmology("Planck2099")


def _ring_field(z0: float = 0.1):
    """A galaxy at (150, 2) and tracers on rings of known angle; decoys outside the velocity window."""
    angles_deg = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6])
    ra = np.concatenate([[150.0], 150.0 + angles_deg / np.cos(np.radians(2.0))])
    dec = np.full(ra.size, 2.0)
    dz_in = 0.8 * (1 + z0) * 1000.0 / C_KMS  # inside +-1000 km/s
    z = np.concatenate([[z0], z0 + dz_in * np.where(np.arange(angles_deg.size) % 2, 1, -1)])
    # decoys: much closer on the sky but 1500 km/s away
    ra = np.concatenate([ra, [150.01, 150.02, 150.03]])
    dec = np.concatenate([dec, [2.0, 2.0, 2.0]])
    z = np.concatenate([z, np.full(3, z0 + 1.5 * (1 + z0) * 1000.0 / C_KMS)])
    return ra, dec, z


def test_sigma_n_on_known_point_set() -> None:
    ra, dec, z = _ring_field()
    dm = distance_table().transverse_distance(z)
    res = projected_density(ra, dec, z, dm, tracer=np.ones(z.size, bool), n=(5, 10))
    # 5th / 10th true neighbours of galaxy 0 are at 0.25 and 0.5 deg (decoys excluded by the velocity cut)
    sep = np.radians([0.25, 0.5])
    expected_d = dm[0] * sep
    np.testing.assert_allclose(res.d_n[0], expected_d, rtol=2e-4)
    np.testing.assert_allclose(res.sigma[0], np.array([5, 10]) / (np.pi * expected_d**2), rtol=5e-4)
    # if decoys were counted, d_5 would be smaller: check the window is what makes the answer
    res_wide = projected_density(ra, dec, z, dm, tracer=np.ones(z.size, bool), n=(5,), dv_kms=3000.0)
    assert res_wide.d_n[0, 0] < 0.9 * expected_d[0]


def test_sigma_n_only_counts_tracers_and_reports_too_few() -> None:
    ra, dec, z = _ring_field()
    dm = distance_table().transverse_distance(z)
    tracer = np.ones(z.size, bool)
    tracer[1:3] = False  # drop the two nearest true neighbours
    res = projected_density(ra, dec, z, dm, tracer=tracer, n=(5, 11))
    np.testing.assert_allclose(res.d_n[0, 0], dm[0] * np.radians(0.35), rtol=2e-4)
    assert np.isnan(res.sigma[0, 1])  # only 10 tracers remain in the window


def test_sigma_n_matches_brute_force_on_random_field() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    ra, dec = rng.uniform(180, 190, n), rng.uniform(0, 10, n)
    z = rng.uniform(0.05, 0.15, n)
    dm = distance_table().transverse_distance(z)
    tracer = rng.random(n) < 0.7
    res = projected_density(ra, dec, z, dm, tracer=tracer, n=(5,))
    from ard_sql.science.positions import unit_vectors

    v = unit_vectors(ra, dec)
    for i in rng.choice(n, 40, replace=False):
        ang = np.arccos(np.clip(v @ v[i], -1, 1))
        y = np.log1p(z) - np.log1p(z[i])
        ok = tracer & (y <= np.log1p(1000 / C_KMS)) & (y >= -np.log1p(1000 / C_KMS) * 1.0000001) & (np.arange(n) != i)
        ref = np.sort(ang[ok])[4] * dm[i]
        assert res.d_n[i, 0] == pytest.approx(ref, rel=1e-5)


def test_knn_density_3d() -> None:
    grid = np.stack(np.meshgrid(*[np.arange(10.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dens = knn_density_3d(grid, grid, k=6, self_in_tracers=np.ones(len(grid), bool))
    centre = np.flatnonzero(np.all(grid == 5.0, axis=1))[0]
    # six neighbours at distance 1 in a unit lattice
    assert dens[centre] == pytest.approx(6 / (4 / 3 * np.pi))


def test_footprint_edge_flag_geometry() -> None:
    rng = np.random.default_rng(4)
    n = 40000
    ra, dec = rng.uniform(100, 140, n), np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-10)), np.sin(np.radians(10)), n)))
    fp = Footprint.from_positions(ra, dec)
    assert fp.nside >= 16
    assert fp.area_deg2 == pytest.approx(40 * 20 * 0.995, rel=0.1)
    edge = np.degrees(fp.edge_angle(np.array([120.0, 100.5, 139.0, 200.0]), np.array([0.0, 0.0, 9.0, 0.0])))
    assert edge[0] > 5.0  # centre: ~10 deg from the nearest edge minus a pixel
    assert edge[1] < 1.0 and edge[2] < 2.0  # near the edges
    assert edge[3] == 0.0  # outside
    r_ra, r_dec = fp.sample(5000, rng)
    assert fp.contains(r_ra, r_dec).all()
    assert 100 - 2 < r_ra.min() and r_ra.max() < 140 + 2
