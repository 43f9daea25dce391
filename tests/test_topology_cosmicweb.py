"""Tidal tensor and T-web classification on analytic fields."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ard_sql.science.cosmicweb import (
    MASKED_CODE,
    WebOptions,
    classify_tweb,
    symmetric_eigenvalues,
    tidal_eigenvalues,
    tidal_tensor,
    web_class_names,
)

N = 48
L = 96.0  # Mpc; cell 2 Mpc


def _coords() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = (np.arange(N) - N // 2) * (L / N)
    return np.meshgrid(x, x, x, indexing="ij")


def test_plane_wave_matches_analytic_tide() -> None:
    x, _, _ = _coords()
    k = 2 * np.pi * 3 / L
    amp, r_s = 2.0, 3.0
    delta = amp * np.cos(k * x)
    t = tidal_tensor(delta, L, r_s)
    expected = delta * np.exp(-0.5 * (k * r_s) ** 2)
    np.testing.assert_allclose(t[0], expected, atol=1e-5)
    np.testing.assert_allclose(t[1:], 0.0, atol=1e-5)


def test_trace_is_gaussian_smoothed_delta() -> None:
    rng = np.random.default_rng(1)
    delta = rng.normal(size=(N, N, N)).astype(np.float32)
    r_s = 4.0
    ev = tidal_eigenvalues(delta, L, r_s)
    smoothed = ndimage.gaussian_filter(delta.astype(np.float64), sigma=r_s / (L / N), mode="wrap")
    smoothed -= smoothed.mean()  # the k=0 mode carries no tide
    # Fourier-space and real-space Gaussians differ by discretisation only (sigma = 2 cells).
    np.testing.assert_allclose(ev.sum(axis=-1), smoothed, atol=0.02 * smoothed.std())
    assert np.all(ev[..., 0] >= ev[..., 1]) and np.all(ev[..., 1] >= ev[..., 2])


@pytest.mark.parametrize(
    ("shape_fn", "expected"),
    [
        (lambda x, y, z: np.exp(-(x**2 + y**2 + z**2) / (2 * 4.0**2)), 3),  # blob: knot
        (lambda x, y, z: np.exp(-(x**2 + y**2) / (2 * 4.0**2)), 2),  # cylinder along z: filament
        (lambda x, y, z: np.exp(-(x**2) / (2 * 4.0**2)), 1),  # slab: sheet
        (lambda x, y, z: -np.exp(-(x**2 + y**2 + z**2) / (2 * 8.0**2)), 0),  # underdense blob: void
    ],
    ids=["knot", "filament", "sheet", "void"],
)
def test_analytic_structures_are_classified(shape_fn, expected: int) -> None:
    x, y, z = _coords()
    delta = 5.0 * shape_fn(x, y, z)
    delta -= delta.mean()
    ev = tidal_eigenvalues(delta, L, smoothing=2.0)
    codes = classify_tweb(ev, lambda_th=0.05)
    c = N // 2
    assert codes[c, c, c] == expected
    # far from the structure the tide is weak: never a knot there (guards against a constant answer)
    if expected != 0:
        assert codes[0, 0, 0] != expected


def test_closed_form_eigenvalues_match_eigvalsh() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5000, 3, 3))
    a = a + a.transpose(0, 2, 1)
    a[:10] = np.diag([1.0, 1.0, 1.0])  # fully degenerate
    a[10:20] = np.diag([2.0, -1.0, -1.0])  # two equal
    ours = symmetric_eigenvalues(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2])
    ref = np.linalg.eigvalsh(a)[:, ::-1]
    np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_classify_counts_and_masks() -> None:
    ev = np.array([[1.0, 0.5, 0.1], [1.0, 0.5, 0.3], [-0.1, -0.2, -0.3], [0.3, 0.3, 0.3], [np.nan, 0, 0]])
    codes = classify_tweb(ev, lambda_th=0.2)
    assert codes.dtype == np.int8
    assert codes.tolist() == [2, 3, 0, 3, MASKED_CODE]
    assert web_class_names(codes).tolist() == ["Filament", "Knot", "Void", "Knot", None]


def test_three_thresholds_apply_to_the_sorted_eigenvalues() -> None:
    # eigenvalues in any order; thresholds (0.1, 0.3, 0.55) for lambda1 >= lambda2 >= lambda3
    ev = np.array([[0.2, 0.05, 0.0], [0.4, 0.2, 0.0], [0.35, 0.5, 0.0], [0.6, 0.5, 0.4], [0.6, 0.7, 0.56], [np.nan, 0, 0]])
    codes = classify_tweb(ev, lambda_th=(0.1, 0.3, 0.55))
    assert codes.tolist() == [1, 1, 2, 2, 3, MASKED_CODE]
    # one threshold repeated three times is the classic T-web
    rng = np.random.default_rng(0)
    ev = rng.normal(0, 0.3, (1000, 3))
    np.testing.assert_array_equal(classify_tweb(ev, (0.2, 0.2, 0.2)), classify_tweb(ev, 0.2))
    with pytest.raises(ValueError, match="non-decreasing"):
        classify_tweb(ev, (0.3, 0.1, 0.5))
    with pytest.raises(ValueError, match="non-decreasing"):
        classify_tweb(ev, (0.1, 0.3))


def test_web_options_take_three_thresholds_from_json_and_reject_bad_ones() -> None:
    assert WebOptions.from_dict({"lambda_th": [0.1, 0.3, 0.55]}).lambda_th == (0.1, 0.3, 0.55)
    assert WebOptions.from_dict({}).lambda_th == 0.2
    with pytest.raises(ValueError, match="lambda_th"):
        WebOptions.from_dict({"lambda_th": [0.5, 0.1, 0.2]})


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        tidal_eigenvalues(np.full((8, 8, 8), np.nan), 10.0, 1.0)
    with pytest.raises(ValueError, match="3-D"):
        tidal_eigenvalues(np.zeros((8, 8)), 10.0, 1.0)
    with pytest.raises(ValueError, match="last axis"):
        classify_tweb(np.zeros((4, 2)), 0.0)
