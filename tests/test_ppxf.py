"""pPXF layer: reference mode (real pPXF), the batched fast fitter, flags, and the build layer.

Default run: real-data reference check (NGC 3522), fast vs reference and fast vs truth on
synthetic spectra, coverage and failure flags, the layer through a small build. Slow
(``-m slow``): fast vs reference and both vs the mock survey's truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import median_abs_deviation

from ard_sql.science import kinematics as K
from ard_sql.science.fastfit import FastFitter
from ard_sql.science.templates import template_file

LINE_COLS = [f"{nm}_Flux" for nm in K.LINE_NAMES]


@pytest.fixture(scope="module")
def tpl() -> Path:
    return template_file(None)


@pytest.fixture(scope="module")
def fast(tpl: Path) -> FastFitter:
    return FastFitter(tpl)


@pytest.fixture(scope="module")
def ref(tpl: Path) -> K.ReferenceFitter:
    return K.ReferenceFitter(tpl)


def _fast_vs_reference(ff, rf) -> tuple[int, int, int, float, list[float]]:
    """(VelDisp measured by fast, by reference, by both; median |dsigma|/sigma; |dflux|/flux of lines at S/N > 10)."""
    s_r, s_f = rf.columns["VelDisp"], ff.columns["VelDisp"]
    ok = np.isfinite(s_r) & np.isfinite(s_f)
    d: list[float] = []
    for c in LINE_COLS:
        f, r, e = ff.columns[c], rf.columns[c], ff.columns[c + "_err"]
        good = np.isfinite(f) & np.isfinite(r) & (f / e > 10)
        d.extend(np.abs(f[good] - r[good]) / np.abs(r[good]))
    dsigma = float(np.median(np.abs(s_f[ok] - s_r[ok]) / s_r[ok]))
    return int(np.isfinite(s_f).sum()), int(np.isfinite(s_r).sum()), int(ok.sum()), dsigma, d


def _line_flux(n: int, rng: np.random.Generator, scale: float = 40.0) -> np.ndarray:
    """Strong-ish star-forming line fluxes (observed units of ``synthetic_batch``)."""
    base = np.array([0.6, 0.8, 0.26, 0.47, 1.0, 0.5, 1.5, 0.35, 2.86, 1.0, 0.45, 0.35])
    return scale * base[None, :] * rng.uniform(0.5, 1.5, (n, 1))


# ---------------------------------------------------------------- reference on real data
def _ngc3522():
    import ppxf
    from astropy.io import fits

    path = Path(ppxf.__file__).parent / "spectra" / "NGC3522_SDSS_DR18.fits"
    with fits.open(path) as h:
        t = h["COADD"].data
        z = float(h["SPECOBJ"].data["Z"][0])
        wave = 10 ** np.asarray(t["loglam"], float)
        flux = np.asarray(t["flux"], float)
        ivar = np.asarray(t["ivar"], float)
        mask = np.asarray(t["and_mask"])
        # SDSS WDISP: LSF sigma in units of the 1e-4 dex pixel
        lsf = np.asarray(t["wdisp"], float) * 1e-4 * np.log(10) * wave
    return wave, flux[None], ivar[None], mask[None], lsf, np.array([z])


def test_reference_ngc3522_recovers_sdss_sigma(ref, fast):
    """SDSS DR18 pipeline: sigma = 97.4 +- 2.4 km/s; ours within 5 km/s, in both modes."""
    args = _ngc3522()
    r = ref.fit(*args)
    assert r.flag[0] & (K.FLAGS["FIT_FAILED"] | K.FLAGS["NO_COVERAGE"]) == 0
    assert abs(r.columns["VelDisp"][0] - 97.4) < 5.0, r.columns["VelDisp"][0]
    assert 0 < r.columns["VelDisp_err"][0] < 10
    f = fast.fit(*args)
    assert abs(f.columns["VelDisp"][0] - 97.4) < 5.0, f.columns["VelDisp"][0]
    assert abs(f.columns["VelDisp"][0] - r.columns["VelDisp"][0]) / r.columns["VelDisp"][0] < 0.05


# ---------------------------------------------------------------- fast vs reference, fast vs truth (synthetic)
def test_fast_agrees_with_reference_on_synthetic_spectra(tpl, fast, ref):
    rng = np.random.default_rng(3)
    n = 6
    z = rng.uniform(0.05, 0.4, n)
    sigma = rng.uniform(80, 260, n)
    wave, flux, ivar, lsf, truth = K.synthetic_batch(tpl, z, sigma, np.full(n, 25.0), _line_flux(n, rng), seed=3)
    rf = ref.fit(wave, flux, ivar, None, lsf, z)
    ff = fast.fit(wave, flux, ivar, None, lsf, z)
    n_fast, n_ref, n_both, dsigma, d = _fast_vs_reference(ff, rf)
    assert n_fast >= n_ref  # fast fails no more often
    assert n_both >= n - 1
    assert dsigma < 0.05
    assert len(d) > 20
    assert np.median(d) < 0.05
    assert np.percentile(d, 90) < 0.05


def test_fast_recovers_synthetic_truth(tpl, fast):
    rng = np.random.default_rng(5)
    n = 32
    z = rng.uniform(0.02, 0.45, n)
    sigma = rng.uniform(70, 300, n)
    lf = _line_flux(n, rng)
    wave, flux, ivar, lsf, truth = K.synthetic_batch(tpl, z, sigma, np.full(n, 20.0), lf, gas_sigma=70.0, seed=5)
    r = fast.fit(wave, flux, ivar, None, lsf, z)
    s = r.columns["VelDisp"]
    assert np.isfinite(s).all()
    assert abs(np.median(s / sigma - 1)) < 0.03
    for j, c in enumerate(LINE_COLS):
        f, e = r.columns[c], r.columns[c + "_err"]
        good = np.isfinite(f) & (f / e > 10)
        if good.sum() >= 5:
            assert abs(np.median(f[good] / lf[good, j] - 1)) < 0.05, c
    g = r.columns["Sigma_gas_forbidden"]
    assert abs(np.nanmedian(g / 70.0 - 1)) < 0.1


# ---------------------------------------------------------------- coverage and failures
def test_lines_outside_coverage_are_null_and_flagged(tpl, fast, ref):
    rng = np.random.default_rng(7)
    z = np.array([0.5, 0.01])
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, z, np.array([150.0, 150.0]), np.full(2, 20.0),
                                                  _line_flux(2, rng), seed=7)
    for fitter in (fast, ref):
        r = fitter.fit(wave, flux, ivar, None, lsf, z)
        # z = 0.5: Halpha at 9847 A and [NII], [SII] beyond the DESI range
        for nm in ("NII_6548", "Halpha", "NII_6584", "SII_6716", "SII_6731"):
            assert np.isnan(r.columns[f"{nm}_Flux"][0]) and np.isnan(r.columns[f"{nm}_Flux_err"][0])
            assert r.flag[0] & K.FLAGS[f"LINE_{nm}"]
        assert np.isfinite(r.columns["OIII_5007_Flux"][0]) and not r.flag[0] & K.FLAGS["LINE_OIII_5007"]
        assert np.isnan(r.columns["Gas_Av"][0]) and r.flag[0] & K.FLAGS["NO_GAS_AV"]
        # z = 0.01: [OII] at 3765 A is inside; every line measured
        assert all(np.isfinite(r.columns[c][1]) for c in LINE_COLS)
        assert not r.flag[1] & sum(K.FLAGS[f"LINE_{nm}"] for nm in K.LINE_NAMES)


def test_stellar_kinematics_without_any_covered_gas_line(tpl, fast, ref):
    """Every emission line masked (e.g. bad pixels): the stars are still fitted, every line is NULL and flagged."""
    z = np.array([0.1, 0.3])
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, z, np.full(2, 150.0), np.full(2, 30.0), seed=11)
    mask = K.near_lines(wave, z, 1500.0).astype(np.int32)
    assert mask.shape == flux.shape and 0 < mask.mean() < 0.5
    for fitter in (fast, ref):
        r = fitter.fit(wave, flux, ivar, mask, lsf, z)
        assert not (r.flag & K.FLAGS["FIT_FAILED"]).any()
        np.testing.assert_allclose(r.columns["VelDisp"], 150.0, rtol=0.05)
        assert all(np.isnan(r.columns[c]).all() for c in LINE_COLS)
        for nm in K.LINE_NAMES:
            assert ((r.flag & K.FLAGS[f"LINE_{nm}"]) > 0).all(), nm


def test_a_spectrum_is_prepared_the_same_whatever_its_batch():
    """The resolution matching of one spectrum does not depend on the other spectra of its batch."""
    from ard_sql import grid

    wave = grid.brz_wavelength()
    rng = np.random.default_rng(5)
    flux = 1 + 0.1 * rng.standard_normal((2, wave.size))
    ivar = np.full(flux.shape, 100.0)
    ivar[0, 500:520] = 0  # masked pixels: their kernel-weighted fraction is propagated too
    lsf = np.full(wave.size, 0.75)  # DESI-like: sharper than the templates, so the galaxy is smoothed
    cfg = K.FitConfig()
    alone = K.prepare(wave, flux[:1], ivar[:1], None, lsf, np.array([0.05]), 2.51, cfg)
    # a z = 0.6 neighbour needs a kernel twice as wide
    batch = K.prepare(wave, flux, ivar, None, lsf, np.array([0.05, 0.6]), 2.51, cfg)
    np.testing.assert_array_equal(alone.flux[0], batch.flux[0])
    np.testing.assert_array_equal(alone.noise[0], batch.noise[0])
    np.testing.assert_array_equal(alone.good[0], batch.good[0])
    assert not np.array_equal(alone.flux[0], K.prepare(wave, flux[:1], ivar[:1], None, lsf, np.array([0.6]), 2.51, cfg).flux[0])


def test_a_template_library_of_varying_resolution_is_matched_per_wavelength():
    """A constant (lam, fwhm) table prepares exactly as the constant; a varying one sets the resolution per pixel."""
    from ard_sql import grid

    wave = grid.brz_wavelength()
    rng = np.random.default_rng(6)
    flux = 1 + 0.1 * rng.standard_normal((1, wave.size))
    ivar = np.full(flux.shape, 100.0)
    lsf = np.full(wave.size, 0.75)
    cfg, z = K.FitConfig(), np.array([0.1])
    lam_t = np.linspace(3500.0, 7400.0, 400)
    const = K.prepare(wave, flux, ivar, None, lsf, z, 2.51, cfg)
    table = K.prepare(wave, flux, ivar, None, lsf, z, (lam_t, np.full(lam_t.size, 2.51)), cfg)
    np.testing.assert_array_equal(const.flux, table.flux)
    np.testing.assert_array_equal(const.fwhm_rest, table.fwhm_rest)
    # 2.51 A blue of 5000 A (rest), 4 A red of it: the galaxy is matched to each
    varying = K.prepare(wave, flux, ivar, None, lsf, z, (lam_t, np.where(lam_t < 5000, 2.51, 4.0)), cfg)
    rest = np.exp(varying.ln_lam) / (1 + z[0])
    good = varying.good[0]
    blue, red = good & (rest > 4000) & (rest < 4900), good & (rest > 5100) & (rest < 7000)
    np.testing.assert_allclose(varying.fwhm_rest[0, blue], 2.51, rtol=1e-6)
    np.testing.assert_allclose(varying.fwhm_rest[0, red], 4.0, rtol=1e-6)
    assert np.std(varying.flux[0, red]) < 0.9 * np.std(const.flux[0, red])  # smoothed more where the templates are broader


def test_unusable_spectra_are_null_and_flagged(tpl, fast, ref):
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, np.array([0.1, 0.1, 0.1]), np.full(3, 150.0), np.full(3, 20.0))
    ivar = ivar.copy()
    ivar[1] = 0.0  # no good pixel
    z = np.array([np.nan, 0.1, 0.1])  # no redshift
    for fitter in (fast, ref):
        r = fitter.fit(wave, flux, ivar, None, lsf, z)
        assert r.flag[0] & K.FLAGS["BAD_REDSHIFT"]
        assert r.flag[1] & K.FLAGS["NO_COVERAGE"]
        for i in (0, 1):
            assert all(np.isnan(v[i]) for v in r.columns.values())
            assert np.isnan(r.stars_model[i]).all()
        assert np.isfinite(r.columns["VelDisp"][2])


def test_failed_fit_gives_nulls_and_flag_never_a_number(tpl, monkeypatch):
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, np.array([0.1, 0.2]), np.full(2, 150.0), np.full(2, 20.0))
    z = np.array([0.1, 0.2])

    def boom(*a, **k):
        raise np.linalg.LinAlgError("singular")

    f = FastFitter(tpl)
    monkeypatch.setattr(f, "_fit_batch", boom)
    rf = K.ReferenceFitter(tpl)
    monkeypatch.setattr(rf, "_fit_one", boom)
    for fitter in (f, rf):
        r = fitter.fit(wave, flux, ivar, None, lsf, z)
        assert (r.flag & K.FLAGS["FIT_FAILED"]).all()
        assert all(np.isnan(v).all() for v in r.columns.values())
        assert np.isnan(r.stars_model).all() and np.isnan(r.gas_model).all()


def test_fast_non_finite_solution_is_flagged(tpl, monkeypatch):
    """A batch whose kinematics come out non-finite is FIT_FAILED with NULLs (no default numbers)."""
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, np.array([0.1]), np.full(1, 150.0), np.full(1, 20.0))
    f = FastFitter(tpl)
    orig = f._lm

    def nan_lm(st, kin, *a, **k):
        kin, conv, jtj = orig(st, kin, *a, **k)
        return kin * np.nan, conv, jtj

    monkeypatch.setattr(f, "_lm", nan_lm)
    r = f.fit(wave, flux, ivar, None, lsf, np.array([0.1]))
    assert r.flag[0] & K.FLAGS["FIT_FAILED"]
    assert all(np.isnan(v[0]) for v in r.columns.values())


def test_not_converged_row_is_all_null_and_flagged(tpl, monkeypatch):
    """A row whose kinematics did not converge reports no number at all (fluxes, chi2, Gas_Av, models): NULL + flag.

    Convergence is decided in ``_lm`` (its second return value); the last pass's verdict is forced False
    for row 0 of the batch, row 1 is left as the fitter decides.
    """
    rng = np.random.default_rng(13)
    z = np.array([0.1, 0.1])
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, z, np.full(2, 150.0), np.full(2, 25.0), _line_flux(2, rng),
                                                  seed=13)
    f = FastFitter(tpl)
    orig = f._lm

    def stuck_lm(st, kin, *a, **k):
        kin, conv, jtj = orig(st, kin, *a, **k)
        conv = conv.clone()
        conv[0] = False
        return kin, conv, jtj

    monkeypatch.setattr(f, "_lm", stuck_lm)
    r = f.fit(wave, flux, ivar, None, lsf, z)
    assert r.flag[0] & K.FLAGS["NOT_CONVERGED"] and not r.flag[0] & K.FLAGS["FIT_FAILED"]
    nulls = [c for c, v in r.columns.items() if not np.isnan(v[0])]
    assert nulls == [], nulls  # every fitted column, PPXF_Chi2 and Gas_Av included
    assert np.isnan(r.stars_model[0]).all() and np.isnan(r.gas_model[0]).all()
    # the converged row keeps its measurements
    assert not r.flag[1] & (K.FLAGS["NOT_CONVERGED"] | K.FLAGS["FIT_FAILED"])
    for c in ("VelDisp", "PPXF_Chi2", "Gas_Av", *LINE_COLS, *(c + "_err" for c in LINE_COLS)):
        assert np.isfinite(r.columns[c][1]), c
    assert np.isfinite(r.stars_model[1]).any() and np.isfinite(r.gas_model[1]).any()


def test_a_failing_spectrum_does_not_fail_its_batch(tpl, monkeypatch, caplog):
    """A batch that raises is refitted one spectrum at a time: only the spectrum that raises alone is FIT_FAILED."""
    import logging

    rng = np.random.default_rng(17)
    z = np.array([0.08, 0.15, 0.22])
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, z, np.full(3, 150.0), np.full(3, 25.0), _line_flux(3, rng),
                                                  seed=17)
    f = FastFitter(tpl)
    orig = f._fit_batch
    calls: list[list[int]] = []

    def picky(prep, sub, *a, **k):
        calls.append(sub.tolist())
        if 1 in sub:
            raise np.linalg.LinAlgError("singular")
        return orig(prep, sub, *a, **k)

    monkeypatch.setattr(f, "_fit_batch", picky)
    with caplog.at_level(logging.WARNING, logger="ard_sql.science.fastfit"):
        r = f.fit(wave, flux, ivar, None, lsf, z)
    assert calls == [[0, 1, 2], [0], [1], [2]]  # one batch, then one spectrum at a time
    assert r.flag[1] & K.FLAGS["FIT_FAILED"]
    assert all(np.isnan(v[1]) for v in r.columns.values()) and np.isnan(r.stars_model[1]).all()
    for i in (0, 2):
        assert not r.flag[i] & K.FLAGS["FIT_FAILED"]
        assert np.isfinite(r.columns["VelDisp"][i]) and np.isfinite(r.columns["Halpha_Flux"][i])
    assert "singular" in caplog.text  # the reason is logged


def test_undetected_gas_has_null_kinematics(tpl, fast):
    """Without emission lines the gas V and sigma are NULL + flagged, not the fit's starting values."""
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, np.array([0.1]), np.full(1, 150.0), np.full(1, 30.0), seed=2)
    r = fast.fit(wave, flux, ivar, None, lsf, np.array([0.1]))
    for c in ("V_gas_balmer", "Sigma_gas_balmer", "V_gas_forbidden", "Sigma_gas_forbidden"):
        assert np.isnan(r.columns[c][0])
    assert r.flag[0] & K.FLAGS["NO_BALMER_GAS"] and r.flag[0] & K.FLAGS["NO_FORBIDDEN_GAS"]
    assert np.isfinite(r.columns["VelDisp"][0])


def test_gas_at_the_upper_sigma_bound_keeps_its_fluxes_and_is_flagged(tpl, fast, ref):
    """Lines 1600 km/s wide pin the gas sigma at 1000 km/s: gas V/sigma NULL, fluxes kept, flag set.

    Lines 70 km/s wide set no such flag.
    """
    rng = np.random.default_rng(8)
    z = np.array([0.1, 0.1])
    bit = K.FLAGS["GAS_SIGMA_AT_UPPER_BOUND"]
    for gas_sigma, flagged in ((1600.0, True), (70.0, False)):
        wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, z, np.full(2, 150.0), np.full(2, 30.0),
                                                     _line_flux(2, rng, 200.0), gas_sigma=gas_sigma, seed=6)
        for fitter in (fast, ref):
            r = fitter.fit(wave, flux, ivar, None, lsf, z)
            name = (type(fitter).__name__, gas_sigma, r.flag)
            assert list((r.flag & bit) > 0) == [flagged] * 2, name
            assert np.all(np.isfinite(r.columns["Halpha_Flux"])), name
            if flagged:
                assert np.all(np.isnan(r.columns["Sigma_gas_balmer"])), name


def test_a_stellar_velocity_far_from_the_redshift_is_flagged_and_kept(tpl, fast, ref):
    """|V_star| > 300 km/s sets V_STAR_OFFSET in both modes; the values stay (the offset may be real)."""
    z = np.array([0.1, 0.1, 0.2])
    v = np.array([0.0, 450.0, -600.0])
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, z, np.full(3, 150.0), np.full(3, 30.0), v_star=v, seed=3)
    bit = K.FLAGS["V_STAR_OFFSET"]
    for fitter in (fast, ref):
        r = fitter.fit(wave, flux, ivar, None, lsf, z)
        np.testing.assert_allclose(r.columns["V_star"], v, atol=20.0)  # measured 1 / 453-459 / -590 to -596
        np.testing.assert_allclose(r.columns["VelDisp"], 150.0, rtol=0.05)
        assert list((r.flag & bit) > 0) == [False, True, True], (type(fitter).__name__, r.flag)


def test_v_star_offset_flag_threshold_and_null_v_star():
    """The bit is set strictly above V_STAR_OFFSET_KMS, on either side, never on a NULL V_star, and changes no value."""
    v = np.array([0.0, 299.9, K.V_STAR_OFFSET_KMS, 300.1, -300.1, -1200.0, np.nan])
    cols = K.empty_columns(v.size)
    cols["V_star"][:] = v
    flag = np.zeros(v.size, np.int32)
    K.finalize_flags(cols, flag, np.ones((v.size, len(K.LINE_NAMES)), bool))
    assert list((flag & K.FLAGS["V_STAR_OFFSET"]) > 0) == [False, False, False, True, True, True, False]
    np.testing.assert_array_equal(cols["V_star"], v)


def test_flags_are_distinct_powers_of_two():
    vals = list(K.FLAGS.values())
    assert len(set(vals)) == len(vals) and all(v & (v - 1) == 0 for v in vals)
    assert max(vals) < 2**31  # PPXF_flag is INTEGER


# ---------------------------------------------------------------- the build layer
@pytest.mark.parametrize("mode", ["fast", pytest.param("reference", marks=pytest.mark.slow)])
def test_layer_writes_partition_and_models(core_ard, mode):
    from ard_sql import contract, paths, spectra_store
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build
    from ard_sql.build.layers.ppxf import PpxfLayer, agreement_file

    opts = BuildOptions(out=str(core_ard), layers=["ppxf"], scheduler="sync", progress=False,
                        layer_options={"ppxf": {"mode": mode, "reference_fraction": 0.2}})
    report = build(opts)
    assert not report.errors, report.errors
    core_files = sorted((paths.staging_dir(core_ard) / "dataset").rglob("Npix=*.parquet"))
    assert core_files
    names = [c.name for c in contract.PPXF_COLUMNS]
    for cf in core_files:
        order = int(cf.parent.parent.name.split("=")[1])
        pixel = int(cf.stem.split("=")[1])
        out = pq.read_table(paths.partition_file(core_ard, order, pixel, "ppxf"))
        core = pq.read_table(cf)
        assert out.num_rows == core.num_rows
        assert set(names) <= set(out.column_names)
        assert set(out.column("PPXF_mode").to_pylist()) == {mode}
        assert paths.model_file(core_ard, "ppxf", order, pixel).exists()
        if mode == "fast":
            assert agreement_file(core_ard, order, pixel).exists()
    tid = int(pq.read_table(core_files[0]).column("TargetID")[0].as_py())
    model = spectra_store.read_model(core_ard, "ppxf", tid)
    assert model is not None and {"stars", "gas"} <= set(model)
    if mode == "fast":
        meta = PpxfLayer.finalize(core_ard, {})
        assert int(meta["ppxf_reference_sample_size"]) >= len(core_files)


def _write_agreement_pairs(ard: Path, pixel: int, n: int, rng: np.random.Generator) -> None:
    """One partition's fast-vs-reference pairs: ``n`` galaxies, sigma 2 % apart, lines at S/N 20 and 1 % apart."""
    import pyarrow as pa

    from ard_sql.build.layers.ppxf import AGREEMENT_LINES, agreement_file

    sigma = rng.uniform(80, 250, n)
    out: dict[str, np.ndarray] = {"TargetID": np.arange(n, dtype=np.int64) + 1000 * pixel,
                                  "VelDisp_fast": sigma * 1.02, "VelDisp_fast_err": sigma * 0.05, "VelDisp_reference": sigma}
    for line in AGREEMENT_LINES:
        flux = rng.uniform(50, 100, n)
        out |= {f"{line}_Flux_fast": flux * 1.01, f"{line}_Flux_fast_err": flux / 20, f"{line}_Flux_reference": flux}
    path = agreement_file(ard, 5, pixel)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(out), path)


def test_agreement_is_reported_only_over_enough_pairs(tmp_path):
    """ard_meta gives an agreement median only over >= MIN_AGREEMENT_PAIRS pairs; with fewer it says so, with n."""
    from ard_sql.build.layers.ppxf import MIN_AGREEMENT_PAIRS, PpxfLayer

    rng = np.random.default_rng(0)
    keys = ["ppxf_agreement_median_abs_dsigma_over_sigma",
            "ppxf_agreement_median_abs_dflux_over_flux_OIII_5007_snr_gt_10",
            "ppxf_agreement_median_abs_dflux_over_flux_Halpha_snr_gt_10"]
    _write_agreement_pairs(tmp_path, 1, 1, rng)  # one partition, one pair: its median is one galaxy
    meta = PpxfLayer.finalize(tmp_path, {})
    assert meta["ppxf_reference_sample_size"] == "1"
    for key in keys:
        assert meta[key].startswith("too few pairs fitted to report (n=1,"), meta[key]
        assert f"at least {MIN_AGREEMENT_PAIRS}" in meta[key] and "0.0" not in meta[key]
    _write_agreement_pairs(tmp_path, 2, MIN_AGREEMENT_PAIRS - 1, rng)  # 1 + 4 = exactly the minimum
    meta = PpxfLayer.finalize(tmp_path, {})
    assert meta[keys[0]] == f"0.0200 (n={MIN_AGREEMENT_PAIRS})"
    assert meta[keys[1]] == meta[keys[2]] == f"0.0100 (n={MIN_AGREEMENT_PAIRS})"


def test_agreement_with_no_pair_says_n_0(tmp_path):
    """Pairs whose fast fit has no VelDisp (or a line below S/N 10) are not counted: the line says n=0."""
    import pyarrow as pa

    from ard_sql.build.layers.ppxf import PpxfLayer, agreement_file

    _write_agreement_pairs(tmp_path, 1, 8, np.random.default_rng(1))
    path = agreement_file(tmp_path, 5, 1)
    t = pq.read_table(path).to_pandas()
    t["VelDisp_fast"] = np.nan
    t["Halpha_Flux_fast_err"] = t["Halpha_Flux_fast"]  # S/N 1
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), path)
    meta = PpxfLayer.finalize(tmp_path, {})
    assert meta["ppxf_agreement_median_abs_dsigma_over_sigma"].startswith("too few pairs fitted to report (n=0,")
    assert meta["ppxf_agreement_median_abs_dflux_over_flux_Halpha_snr_gt_10"].startswith("too few pairs fitted to report (n=0,")
    assert meta["ppxf_agreement_median_abs_dflux_over_flux_OIII_5007_snr_gt_10"] == "0.0100 (n=8)"


# ---------------------------------------------------------------- the mock survey (slow)
@pytest.fixture(scope="module")
def mock_ard(tmp_path_factory):
    from ard_sql.build.mock.survey import MockConfig, run_mock
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    root = tmp_path_factory.mktemp("ppxf_mock")
    run_mock(MockConfig(out=root / "m", n=300, seed=1, truth_spectra=False))
    report = build(BuildOptions(source=str(root / "m"), out=str(root / "a"), layers=[], scheduler="sync", progress=False))
    assert not report.errors
    return root


def _mock_galaxies(root: Path):
    import pandas as pd

    from ard_sql import paths, spectra_store

    files = sorted((paths.staging_dir(root / "a") / "dataset").rglob("Npix=*.parquet"))
    truth = pq.read_table(root / "m" / "truth.parquet").to_pandas().set_index("TARGETID")
    parts = []
    for cf in files:
        core = pq.read_table(cf).to_pandas()
        core = core[core.SPECTYPE == "GALAXY"]
        order, pixel = int(cf.parent.parent.name.split("=")[1]), int(cf.stem.split("=")[1])
        s = spectra_store.read_partition(root / "a", order, pixel, core.TargetID.to_numpy())
        parts.append((s, core, truth.loc[core.TargetID.to_numpy()]))
    wave = parts[0][0].wave
    flux = np.concatenate([p[0].flux for p in parts])
    ivar = np.concatenate([p[0].ivar for p in parts])
    mask = np.concatenate([p[0].mask for p in parts])
    lsf = parts[0][0].lsf_sigma
    core = pd.concat([p[1] for p in parts])
    tr = pd.concat([p[2] for p in parts])
    return wave, flux, ivar, mask, lsf, core, tr


@pytest.mark.slow
def test_mock_sigma_and_line_fluxes_match_truth(mock_ard, fast):
    """VelDisp bias < 3% at S/N > 10 (sigma above the instrumental limit); line fluxes unbiased to 5%.

    The fit is told the DESI LSF the data carry (RESOLUTION), as in the layer: the mock counts the
    library's own resolution in SIGMA_STAR (``spectra.kinematic_broadening``), like a real galaxy.
    """
    wave, flux, ivar, mask, lsf, core, tr = _mock_galaxies(mock_ard)
    z = core.Z.to_numpy()
    r = fast.fit(wave, flux, ivar, mask, lsf, z)
    sel = (core.SNR_Median.to_numpy() > 10) & (tr.SIGMA_STAR.to_numpy() > 70) & np.isfinite(r.columns["VelDisp"])
    assert sel.sum() >= 20
    assert abs(np.median(r.columns["VelDisp"][sel] / tr.SIGMA_STAR.to_numpy()[sel] - 1)) < 0.03
    # V_star against the true redshift's offset (stars and lines both in vacuum), and honest errors
    v_true = K.C_KMS * (tr.Z.to_numpy() - z) / (1 + z)
    ok = np.isfinite(r.columns["V_star"])
    assert abs(np.median(r.columns["V_star"][ok] - v_true[ok])) < 10
    for col, truth in (("VelDisp", tr.SIGMA_STAR.to_numpy()), ("V_star", v_true)):
        pull = (r.columns[col] - truth) / r.columns[f"{col}_err"]
        pull = pull[np.isfinite(pull)]
        width = median_abs_deviation(pull, scale="normal")
        assert 0.75 < width < 1.35, (col, width)
    tested = 0
    for nm in K.LINE_NAMES:
        if nm.startswith("OII_"):
            continue  # the [OII] doublet is blended at DESI resolution: its sum is tested below
        f, e, t = r.columns[f"{nm}_Flux"], r.columns[f"{nm}_Flux_err"], tr[f"{nm}_Flux"].to_numpy()
        good = np.isfinite(f) & (f / e > 10)
        # 20 lines at least: a median of fewer, at ~10-15 % scatter each, is itself uncertain by ~5 %
        if good.sum() >= 20:
            tested += 1
            assert abs(np.median(f[good] / t[good] - 1)) < 0.05, nm
    assert tested >= 6
    f = r.columns["OII_3726_Flux"] + r.columns["OII_3729_Flux"]
    e = np.hypot(r.columns["OII_3726_Flux_err"], r.columns["OII_3729_Flux_err"])
    t = tr["OII_3726_Flux"].to_numpy() + tr["OII_3729_Flux"].to_numpy()
    good = np.isfinite(f) & (f / e > 10)
    assert good.sum() >= 10 and abs(np.median(f[good] / t[good] - 1)) < 0.05


@pytest.mark.slow
def test_mock_fast_agrees_with_reference(mock_ard, fast, ref):
    wave, flux, ivar, mask, lsf, core, tr = _mock_galaxies(mock_ard)
    z = core.Z.to_numpy()
    pick = np.random.default_rng(0).choice(z.size, 40, replace=False)
    args = (wave, flux[pick], ivar[pick], mask[pick], lsf, z[pick])
    rf, ff = ref.fit(*args), fast.fit(*args)
    n_fast, n_ref, _, dsigma, d = _fast_vs_reference(ff, rf)
    assert n_fast >= n_ref
    assert dsigma < 0.05
    assert np.median(d) < 0.05


# ---------------------------------------------------------------- errors under correlated noise
def test_err_scale_gives_the_true_error_of_a_fit_to_smoothed_resampled_noise():
    """Smoothing to the templates' resolution and resampling to log pixels correlate the noise.

    The inverse-variance mean of a window of prepared pixels (what a fitted amplitude is, for a
    slowly varying model) scatters over noise realisations as ``err_scale`` predicts; the diagonal
    noise alone understates it ~2x (bench/RESULTS.md, "pPXF layer against the mock truth").
    """
    from ard_sql.grid import brz_wavelength

    wave = brz_wavelength()
    rng = np.random.default_rng(1)
    n = 800
    flux = 1.0 + rng.normal(0.0, 0.1, (n, wave.size))
    ivar = np.full_like(flux, 100.0)
    lsf = np.full(wave.size, 0.75)  # DESI-like LSF, narrower than the templates' 2.51 A FWHM x (1 + z)
    prep = K.prepare(wave, flux, ivar, None, lsf, np.full(n, 0.1), 2.51, K.FitConfig())
    cols = np.flatnonzero(prep.good.all(0))
    ratios_naive = []
    for lo in (0.1, 0.45, 0.8):  # blue, middle and red of the fitted range
        win = cols[int(lo * cols.size):int(lo * cols.size) + 120]
        w = 1.0 / prep.noise[0, win] ** 2
        est = (prep.flux[:, win] * w).sum(1) / w.sum()
        measured = est.var()
        naive = 1.0 / w.sum()
        predicted = (w * prep.err_scale[0, win] ** 2).sum() / w.sum() ** 2
        assert 0.85 < measured / predicted < 1.15, (lo, measured / predicted)
        ratios_naive.append(measured / naive)
    assert max(ratios_naive) > 3.0  # the correction is not a no-op here


# ---------------------------------------------------------------- option checks (before any work)
def test_check_options_names_a_bad_templates_file(tmp_path):
    from ard_sql.build.layers.ppxf import PpxfLayer

    missing = tmp_path / "nope.npz"
    with pytest.raises(ValueError, match=f"templates {missing}: no such file"):
        PpxfLayer.check_options({"templates": str(missing)})
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=f"templates {garbage}: cannot be read"):
        PpxfLayer.check_options({"templates": str(garbage)})
    incomplete = tmp_path / "incomplete.npz"
    np.savez(incomplete, lam=np.arange(5.0))
    with pytest.raises(ValueError, match=f"{incomplete}: not a pPXF sps_lib file"):
        PpxfLayer.check_options({"templates": str(incomplete)})
    good = tmp_path / "good.npz"
    lam = np.linspace(4000.0, 6000.0, 50)
    np.savez(good, templates=np.ones((50, 2, 1)), lam=lam, fwhm=np.full(50, 2.5), ages=np.array([1.0, 5.0]),
             metals=np.array([0.0]), masses=np.ones((2, 1)))
    assert PpxfLayer.check_options({"templates": str(good), "mode": "fast"}) == {"templates": str(good), "mode": "fast"}


def test_a_line_fitted_at_zero_still_has_an_error(tpl, fast):
    """Lines absent from the spectrum: non-negative fluxes, and every one has a finite, positive error.

    The non-negativity holds many of them at exactly 0; their error is the one they would have if
    freed, so that ``3 * err`` is an upper limit, never ``0 +- 0``.
    """
    rng = np.random.default_rng(11)
    n = 24
    z = rng.uniform(0.05, 0.3, n)
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, z, rng.uniform(80, 250, n), np.full(n, 10.0), None, seed=11)
    r = fast.fit(wave, flux, ivar, None, lsf, z)
    f = np.stack([r.columns[c] for c in LINE_COLS], 1)
    e = np.stack([r.columns[c + "_err"] for c in LINE_COLS], 1)
    measured = np.isfinite(f)
    assert measured.sum() > 100 and (f[measured] == 0).sum() > 20  # many held at the bound
    assert np.all(f[measured] >= 0)
    assert np.all(np.isfinite(e[measured]) & (e[measured] > 0))
    assert np.mean(f[measured] / e[measured] < 3) > 0.95  # upper limits, not detections


def test_a_spectrum_without_stars_gets_no_stellar_kinematics(tpl, fast, ref):
    """Emission lines on a flat zero continuum: no template weight, so V_star and VelDisp are NULL + flagged.

    Without the check the fit reported its starting sigma (150 km/s) with an error of 0.
    """
    rng = np.random.default_rng(4)
    n = 3
    z = np.full(n, 0.1)
    lf = _line_flux(n, rng)
    # noise-free, so that no template weight can be spent on fitting noise
    wave, flux, ivar, lsf, _ = K.synthetic_batch(tpl, z, np.full(n, 150.0), np.full(n, 1e4), lf, seed=4)
    _, cont, _, _, _ = K.synthetic_batch(tpl, z, np.full(n, 150.0), np.full(n, 1e4), None, seed=4)
    flux = flux - cont  # the same lines, no stars
    for fitter in (fast, ref):
        r = fitter.fit(wave, flux, ivar, None, lsf, z)
        name = type(fitter).__name__
        assert np.all(r.flag & K.FLAGS["STARS_UNCONSTRAINED"]), (name, r.flag)
        assert np.all(np.isnan(r.columns["VelDisp"]) & np.isnan(r.columns["V_star"])), name
        assert np.all(r.columns["Halpha_Flux"] / r.columns["Halpha_Flux_err"] > 10), name  # lines still measured
