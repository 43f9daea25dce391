"""Build layer ``bagpipes``: stellar-population posteriors (p16/p50/p84) for every galaxy.

Two sources fill the same columns (:data:`ard_sql.contract.BAGPIPES_COLUMNS`):

``amortized`` (every galaxy, at build time)
    a mixture-density network (:mod:`ard_sql.science.amortized`) trained on
    simulations of the Swiss Army model (:mod:`ard_sql.science.pipes_model`):
    bagpipes' own ``model_galaxy`` with the BC03 grids, Calzetti dust, nebular
    emission, velocity broadening and the calibration polynomial, on the 8 A
    fitting bins, with DESI-like noise.
``bagpipes`` (where the daemon has finished a nested-sampling fit)
    rows of ``artifacts/bagpipes/fits/...parquet`` written by ``ard daemon
    bagpipes`` (:mod:`ard_sql.commands.daemon`); such a row replaces the
    amortized one. A fit that failed leaves the amortized values in place and
    adds its flag bit (``FIT_FAILED`` / ``NOT_CONVERGED``) to ``Bagpipes_flag``.

Rows that are not ``SPECTYPE = 'GALAXY'`` get NULL values, a NULL
``Physics_Source`` and the ``NOT_GALAXY`` flag; galaxies the estimator cannot
handle (no usable bins, redshift missing or outside the trained range) get
NULL values with ``Physics_Source = 'amortized'`` and the reason's flag.

Hooks:

``prepare`` (once, main process)
    simulates the training set (``n_sims`` noiseless model spectra, default
    80,000: 17 ms each on one core, ~12 min on 2 cores with ``sim_workers``)
    and a held-out test set (``n_test``, default 500), trains the network
    (``epochs``, default 40, with fresh noise every 2 epochs; ~3 min), measures
    the statistical posterior's 68 % coverage on the test set, then fits the
    model-error floor on ``model_error_mocks`` prior-drawn mock surveys (default
    3 of 600 targets, seeds 1001...; ~1 min each: mock, DESI files, ingest) and
    writes ``artifacts/bagpipes/estimator.pt`` + ``training.json``.
    Simulations, calibration mocks and weights are cached by content key in
    ``cache_dir`` (an option; default ``artifacts/bagpipes/cache``), so a
    re-run (or another ARD or test sharing ``cache_dir``) trains nothing.
``run`` (per partition)
    amortized rows for the partition, then the daemon's fits merged over them.
``finalize``
    training provenance, held-out coverage and the number of Bagpipes fits
    into ``ard_meta``.

Options (``--set bagpipes.key=value``): ``n_sims``, ``n_test``, ``epochs``,
``seed``, ``n_pca``, ``hidden``, ``cache_dir``, ``batch_size`` (rows per
inference batch, default 4096), ``sim_workers`` (processes simulating,
default 2), ``model_error_mocks`` (0: report the statistical posterior alone).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ard_sql import contract, paths
from ard_sql.build import hats_writer
from ard_sql.build.layers.base import Partition, count, parse_options, positive_integer

if TYPE_CHECKING:  # annotations only: amortized imports torch, which most builds never need
    from ard_sql.science.amortized import AmortizedConfig, AmortizedEstimator

#: A progress logger: called with one line of text.
Log = Callable[[str], None]

_OPTIONS = {"n_sims": positive_integer, "n_test": count, "epochs": positive_integer, "seed": count,
            "n_pca": positive_integer, "hidden": positive_integer, "cache_dir": str, "batch_size": positive_integer,
            "sim_workers": positive_integer, "model_error_mocks": count}
DEFAULTS = {"n_sims": 80000, "n_test": 500, "epochs": 40, "seed": 0, "batch_size": 4096, "sim_workers": 2,
            "model_error_mocks": 3}
#: Targets per calibration mock and the first seed (the slow tests' prior-drawn mock uses seed 2).
MODEL_ERROR_MOCK_N, MODEL_ERROR_SEED0 = 600, 1001
ESTIMATOR, TRAIN_LOG = "estimator.pt", "training.json"
#: Layer name, also the models/ and artifacts/ folder name.
NAME = "bagpipes"
_CACHE: dict[str, Any] = {}


def options(raw: dict[str, Any]) -> dict[str, Any]:
    """Typed options with defaults; an unknown key is an error naming the known ones."""
    return {**DEFAULTS, **parse_options("bagpipes", raw, _OPTIONS)}


def amortized_config(opts: dict[str, Any]) -> AmortizedConfig:
    """The :class:`AmortizedConfig` these options ask for."""
    from ard_sql.science.amortized import AmortizedConfig

    cfg = AmortizedConfig(n_sims=opts["n_sims"], epochs=opts["epochs"], seed=opts["seed"])
    for key in ("n_pca", "hidden"):
        if key in opts:
            cfg = replace(cfg, **{key: opts[key]})
    return cfg


def simulation_key(n: int, seed: int) -> str:
    """Content key of a simulated set: its size and seed and everything the forward model depends on."""
    from ard_sql.science import amortized as am
    from ard_sql.science import pipes_model as pm

    blob = json.dumps({"n": n, "seed": seed, "model": pm.model_key(), "content": "noiseless model_flux",
                       "z": [am.Z_MIN, am.Z_MAX], "snr": [am.SNR_MIN, am.SNR_MAX], "veldisp": am.VELDISP_RANGE},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _cached_npz(path: Path, make) -> dict[str, np.ndarray]:
    """Arrays of ``path``; when absent, ``make()``'s, written atomically first."""
    if path.exists():
        with np.load(path, allow_pickle=False) as blob:
            return {k: blob[k] for k in blob.files}
    data = make()
    with paths.atomic_path(path, suffix=".npz") as tmp:  # .npz: np.savez would append it otherwise
        np.savez(tmp, **data)
    return data


def cached_simulations(cache: Path, n: int, seed: int, log: Log | None = None, workers: int = 1) -> dict[str, np.ndarray]:
    """Noiseless simulated set of size ``n`` from ``cache`` (``sims-<key>.npz``), simulating it when absent."""
    from ard_sql.science.amortized import simulate_training_set

    def make() -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        sims = simulate_training_set(n, seed=seed, workers=workers, progress=log is not None and n > 5000)
        if log:
            log(f"simulated {n} spectra in {time.perf_counter() - t0:.0f} s")
        return sims

    return _cached_npz(Path(cache) / f"sims-{simulation_key(n, seed)}.npz", make)


#: The held-out set's seed is the training seed plus this: a different stream, never seen in training.
HELDOUT_SEED_OFFSET = 7919


def heldout_set(cache: Path, opts: dict[str, Any], log: Log | None = None) -> dict[str, np.ndarray]:
    """The held-out test simulations, realised with noise and calibration (a seed of their own)."""
    from ard_sql.science.amortized import realise

    seed = opts["seed"] + HELDOUT_SEED_OFFSET
    sims = cached_simulations(cache, opts["n_test"], seed, log)
    return {**sims, **realise(sims, np.random.default_rng([seed, 2]))}


def _mock_code_key() -> str:
    from ard_sql.build import mock

    h = hashlib.sha1()
    for f in sorted(Path(mock.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


#: Mock truth column of each quantity the calibration mocks constrain. t_quench has no column (the
#: mock's T_QUENCH is bagpipes' definition, not ours): it is read off each true history by
#: ``build.mock.truth.t_quench_truth`` (:data:`T_QUENCH_TRUTH`).
MOCK_TRUTH = {"LogMass": "LOG_MASS", "SFR": "SFR", "sSFR": "SSFR", "Age": "AGE_MW", "Dust_Av": "AV",
              "Metallicity": "METALLICITY", "Tau": "TAU"}
#: How the calibration set's t_quench truth is made (part of its cache key). The calibration mocks are
#: prior-drawn (pure delayed tau), so it is exactly ``age - x_q tau`` of their true parameters.
T_QUENCH_CALIBRATION = "t_quench_truth: first fall below 10 % of the peak SFR, from the true SFH"


def model_error_key(n_mocks: int) -> str:
    """Content key of the calibration set: mock size, seeds, mock code, binning and which galaxies count."""
    return hashlib.sha1(json.dumps({"n": MODEL_ERROR_MOCK_N, "mocks": n_mocks, "seed0": MODEL_ERROR_SEED0,
                                    "mock_code": _mock_code_key(), "bin": _bin_key(),
                                    "truth": {**MOCK_TRUTH, "t_quench": T_QUENCH_CALIBRATION},
                                    "selection": "GALAXY, Z in range, MIN_GOOD_BINS"}, sort_keys=True
                                   ).encode()).hexdigest()[:12]


def model_error_set(cache: Path, n_mocks: int, log: Log | None = None) -> dict[str, np.ndarray]:
    """Binned spectra, Z and truth of the galaxies of ``n_mocks`` prior-drawn mock surveys (cached).

    Each mock (``ard mock --physics prior``, 600 targets, seeds 1001...) goes
    through DESI files and the ingest like any survey, so the calibration sees
    what the estimator sees on real data, made by another forward model. The
    galaxies kept are those the estimator gives values (``predict_rows``).
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)

    def make() -> dict[str, np.ndarray]:
        import tempfile

        parts = []
        for i in range(n_mocks):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                parts.append(_mock_galaxies(Path(tmp), MODEL_ERROR_SEED0 + i))
            if log:
                log(f"calibration mock {i + 1}/{n_mocks}: {len(parts[-1]['z'])} galaxies in {time.perf_counter() - t0:.0f} s")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return _cached_npz(cache / f"model-error-{model_error_key(n_mocks)}.npz", make)


def _bin_key() -> str:
    from ard_sql.science import pipes_model as pm

    return f"{pm.FIT_BIN}:{pm.fit_wavelengths()[0]:.3f}:{pm.fit_wavelengths().size}"


def binned_spectra(ard_dir: Path | str, select: Callable[[pa.Table], np.ndarray]) -> dict[str, np.ndarray]:
    """Binned spectra (``pipes_model.bin_spectra``), Z and TargetID of the core rows ``select`` keeps.

    ``select(core)`` gets each partition's core table (TargetID, Z, SPECTYPE)
    and returns a boolean mask. Rows come partition by partition, in core order.
    """
    from ard_sql import spectra_store
    from ard_sql.science import pipes_model as pm

    flux, ivar, z, tids = [], [], [], []
    for order, pixel, f in hats_writer.partition_files(ard_dir, paths.CORE):
        core = pq.read_table(f, columns=["TargetID", "Z", "SPECTYPE"])
        keep = np.asarray(select(core), bool)
        if not keep.any():
            continue
        sel = core.column("TargetID").to_numpy()[keep]
        spec = spectra_store.read_partition(ard_dir, order, pixel, sel)
        b_flux, b_ivar = pm.bin_spectra(spec.flux, spec.ivar)
        flux.append(b_flux.astype(np.float32))
        ivar.append(b_ivar.astype(np.float32))
        z.append(core.column("Z").to_numpy(zero_copy_only=False).astype(float)[keep])
        tids.append(sel)
    if not tids:
        raise ValueError(f"{ard_dir}: no core row selected")
    return {"flux": np.vstack(flux), "ivar": np.vstack(ivar), "z": np.concatenate(z), "TargetID": np.concatenate(tids)}


def _mock_galaxies(tmp: Path, seed: int) -> dict[str, np.ndarray]:
    """One prior-drawn mock, ingested into a scratch ARD: its galaxies' binned spectra and truth."""
    from ard_sql.build.mock.survey import MockConfig, run_mock
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build
    from ard_sql.science import amortized as am
    from ard_sql.science.pipes_fit import MIN_GOOD_BINS

    run_mock(MockConfig(out=tmp / "mock", n=MODEL_ERROR_MOCK_N, seed=seed, physics="prior", truth_spectra=False))
    report = build(BuildOptions(source=str(tmp / "mock"), out=str(tmp / "ard"), layers=[], scheduler="sync",
                                progress=False))
    if report.errors:
        raise RuntimeError(f"bagpipes layer: calibration mock (seed {seed}) did not ingest: {report.errors}")

    def galaxies_in_range(core: pa.Table) -> np.ndarray:
        z = core.column("Z").to_numpy(zero_copy_only=False).astype(float)
        return galaxy_mask(core) & (z >= am.Z_MIN) & (z <= am.Z_MAX)

    data = binned_spectra(tmp / "ard", galaxies_in_range)
    usable = (data["ivar"] > 0).sum(axis=1) >= MIN_GOOD_BINS  # the rows predict_rows gives values
    data = {k: v[usable] for k, v in data.items()}
    from ard_sql.build.mock.truth import SFH_COLUMNS, t_quench_truth

    wanted = ["TARGETID", *dict.fromkeys([*MOCK_TRUTH.values(), "SPECTYPE", *SFH_COLUMNS])]
    truth = pq.read_table(tmp / "mock" / "truth.parquet", columns=wanted).to_pandas().set_index("TARGETID")
    t = truth.loc[data["TargetID"]]
    return {**data, **{f"truth_{q}": t[col].to_numpy(float) for q, col in MOCK_TRUTH.items()},
            "truth_t_quench": t_quench_truth(t)}


def train_estimator(cache: Path, opts: dict[str, Any], log: Log | None = None) -> tuple[Path, dict[str, Any]]:
    """The trained estimator file in ``cache`` and its training log (cached by content key)."""
    from ard_sql.science import amortized as am

    cfg = amortized_config(opts)
    train_key = simulation_key(cfg.n_sims, cfg.seed)
    test_key = simulation_key(opts["n_test"], cfg.seed + HELDOUT_SEED_OFFSET)
    error_key = (f"{model_error_key(opts['model_error_mocks'])} level {am.MODEL_ERROR_LEVEL}"
                 if opts["model_error_mocks"] > 0 else "none")
    key = hashlib.sha1(f"{train_key}|{test_key}|{am.config_fingerprint(cfg)}|model-error {error_key}"
                       .encode()).hexdigest()[:12]
    est_path, log_path = Path(cache) / f"estimator-{key}.pt", Path(cache) / f"estimator-{key}.json"
    if est_path.exists() and log_path.exists():
        # the log is the training's (its seconds are that run's); say this run loaded the weights
        return est_path, {**json.loads(log_path.read_text()), "loaded_from_cache": str(est_path)}
    sims_cached = (Path(cache) / f"sims-{train_key}.npz").exists()
    t0 = time.perf_counter()
    sims = cached_simulations(cache, cfg.n_sims, cfg.seed, log, workers=opts["sim_workers"])
    t_sim = time.perf_counter() - t0
    import torch

    from ard_sql.science.fastfit import torch_threads

    # at most 2 threads for the training, and only here: the cap is restored on exit, so that the
    # process's later torch users (the embed layer's training) keep their thread count
    with torch_threads(max(1, min(2, torch.get_num_threads()))):
        est = am.AmortizedEstimator.train(sims, cfg, log=None)
        del sims
        t_train = time.perf_counter() - t0 - t_sim
        info: dict[str, Any] = {"key": key, "config": asdict(cfg), "simulations": train_key,
                                "simulate_seconds": round(t_sim, 1), "simulations_cached": sims_cached,
                                "train_seconds": round(t_train, 1)}
        if opts["n_test"] > 0:
            test = heldout_set(cache, opts, log)
            q = est.percentiles_binned(test["flux"], test["ivar"], test["z"], model_error=False)
            truth = {k[len("truth_"):]: v for k, v in test.items() if k.startswith("truth_")}
            info["heldout_n"] = int(opts["n_test"])
            info["heldout_coverage68"] = {k: round(v, 3) for k, v in am.coverage(q, truth).items()}
            info["heldout_median_abs_dlogmass"] = round(float(np.median(np.abs(q[:, 0, 1] - truth["LogMass"]))), 3)
        if opts["model_error_mocks"] > 0:
            t1 = time.perf_counter()
            cal = model_error_set(cache, opts["model_error_mocks"], log)
            truth = {q: cal[f"truth_{q}"] for q in am.QUANTITIES if f"truth_{q}" in cal}
            before = est.percentiles_binned(cal["flux"], cal["ivar"], cal["z"], model_error=False)
            err = est.fit_model_error(cal["flux"], cal["ivar"], cal["z"], truth)
            after = est.percentiles_binned(cal["flux"], cal["ivar"], cal["z"])
            info["model_error"] = {q: round(float(v), 4) for q, v in zip(am.QUANTITIES, err)}
            info["model_error_n"] = int(len(cal["z"]))
            info["model_error_coverage68_before"] = {k: round(v, 3) for k, v in am.coverage(before, truth).items()}
            info["model_error_coverage68_after"] = {k: round(v, 3) for k, v in am.coverage(after, truth).items()}
            info["model_error_seconds"] = round(time.perf_counter() - t1, 1)
    est.save(est_path)
    paths.atomic_write_text(log_path, json.dumps(info, indent=1))
    return est_path, info


def training_summary(info: dict[str, Any]) -> str:
    """One line for ``ard_meta`` (``bagpipes_amortized_training``) from a training log.

    Says whether this build trained the estimator (and whether it simulated or
    loaded its simulations) or loaded a cached one, and from which file; the
    seconds of a cached estimator are those of the run that trained it.
    """
    n_sims = info.get("config", {}).get("n_sims", "?")
    sim_s, train_s = info.get("simulate_seconds", 0), info.get("train_seconds", 0)
    if info.get("loaded_from_cache"):
        return (f"estimator loaded from cache {info['loaded_from_cache']} (nothing simulated or trained by this "
                f"build; it was trained on {n_sims} simulations: {sim_s} s simulating, {train_s} s training)")
    simulated = ("simulations loaded from cache" if info.get("simulations_cached")
                 else f"{sim_s} s simulating")
    return f"trained by this build: {n_sims} simulations ({simulated}), {train_s} s training"


def estimator_file(ard_dir: Path | str) -> Path:
    """The estimator the ARD's amortized rows came from."""
    return paths.artifact_dir(ard_dir, NAME) / ESTIMATOR


def load_estimator(ard_dir: Path | str) -> AmortizedEstimator:
    """The ARD's estimator, loaded once per process (reloaded when the file changes)."""
    from ard_sql.science.amortized import AmortizedEstimator

    path = estimator_file(ard_dir)
    if not path.exists():
        raise FileNotFoundError(f"bagpipes layer: no amortized estimator at {path}; run `ard build --layers bagpipes`")
    key = f"{path.resolve()}|{path.stat().st_mtime_ns}"
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = AmortizedEstimator.load(path)
    return _CACHE[key]


# ---------------------------------------------------------------- rows
def galaxy_mask(core: pa.Table) -> np.ndarray:
    """True for the core rows Bagpipes and the estimator handle (SPECTYPE = 'GALAXY')."""
    spectype = core.column("SPECTYPE").fill_null("").to_pylist()
    return np.array([s.strip().upper() == "GALAXY" for s in spectype], dtype=bool)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Contract rows (dicts) -> an Arrow table with the contract's columns and types."""
    cols = contract.columns(NAME)
    schema = pa.schema([pa.field(c.name, hats_writer.arrow_type(c.type)) for c in cols])
    return pa.Table.from_pylist(rows, schema=schema)


def amortized_table(estimator: AmortizedEstimator, core: pa.Table, flux: np.ndarray, ivar: np.ndarray,
                    batch_size: int = 4096) -> pa.Table:
    """Amortized rows for every core row (non-galaxies: NULL + ``NOT_GALAXY``), in core order."""
    from ard_sql.science.pipes_fit import FLAGS, null_row

    targetid = core.column("TargetID").to_numpy()
    z = core.column("Z").to_numpy(zero_copy_only=False).astype(np.float64)
    gal = galaxy_mask(core)
    rows: list[dict] = [null_row(t, FLAGS["NOT_GALAXY"], None) for t in targetid]
    idx = np.flatnonzero(gal)
    for i0 in range(0, idx.size, batch_size):
        sel = idx[i0:i0 + batch_size]
        for i, row in zip(sel, estimator.predict_rows(targetid[sel], z[sel], flux[sel], ivar[sel])):
            rows[i] = row
    return rows_to_table(rows)


#: Column of the fit files naming the model a fit was made with (``pipes_model.model_key``).
MODEL_KEY = "Model_Key"
#: Field of the layer's training.json naming the model of its amortized rows.
MODEL_KEY_FIELD = "model_key"


def staged_model_key(ard_dir: Path | str) -> str | None:
    """The model key of the ARD's amortized rows ('' when built before keys existed; None if never built)."""
    log_path = paths.artifact_dir(ard_dir, NAME) / TRAIN_LOG
    if not log_path.exists():
        return None
    return json.loads(log_path.read_text()).get(MODEL_KEY_FIELD, "")


def current_fits(table: pa.Table) -> pa.Table:
    """The rows of a fit file made with today's model (files from before model keys count as stale)."""
    from ard_sql.science import pipes_model as pm

    if MODEL_KEY not in table.column_names:
        return table.slice(0, 0)
    return table.filter(pc.equal(table.column(MODEL_KEY), pm.model_key()))


def read_fits(ard_dir: Path | str, order: int, pixel: int) -> pa.Table | None:
    """The daemon's finished fits of one partition made with the current model (contract columns), or None."""
    path = paths.bagpipes_fits_file(ard_dir, order, pixel)
    if not path.exists():
        return None
    return current_fits(pq.read_table(path)).select([c.name for c in contract.columns(NAME)])


#: Flags of a fit row that mean "no values": the amortized row stays, with the flag added.
def _failed_fit_bits() -> int:
    from ard_sql.science.pipes_fit import FLAGS

    return FLAGS["FIT_FAILED"] | FLAGS["NOT_CONVERGED"] | FLAGS["NO_DATA"] | FLAGS["BAD_REDSHIFT"]


def merge_fits(base: pa.Table, fits: pa.Table | None) -> pa.Table:
    """``base`` (contract rows, any order) with the daemon's ``fits`` merged in, same row order.

    A fit with values replaces its row (Physics_Source = 'bagpipes'); a fit
    without values (failed, not converged) keeps the base values and ORs its
    flag into ``Bagpipes_flag``. Idempotent: merging twice gives the same table.
    """
    names = [c.name for c in contract.columns(NAME)]
    base = base.select(names)
    if fits is None or fits.num_rows == 0:
        return base
    fits = fits.select(names)
    tid = base.column("TargetID").to_numpy()
    ftid = fits.column("TargetID").to_numpy()
    pos = {int(t): i for i, t in enumerate(tid)}
    has_values = fits.column("LogMass_p50").is_valid().to_numpy(zero_copy_only=False)
    fflag = fits.column("Bagpipes_flag").fill_null(0).to_numpy()
    take_from_fit = np.full(len(tid), -1, np.int64)
    extra_flag = np.zeros(len(tid), np.int64)
    for j, t in enumerate(ftid):
        i = pos.get(int(t))
        if i is None:
            continue  # a target no longer in this partition
        if has_values[j]:
            take_from_fit[i] = j
        else:
            extra_flag[i] |= int(fflag[j]) & _failed_fit_bits()
    out = []
    use_fit = take_from_fit >= 0
    src = pa.array(np.where(use_fit, take_from_fit, 0))
    for name in names:
        col = base.column(name).combine_chunks()
        if use_fit.any():
            fit_col = fits.column(name).combine_chunks().take(src)
            col = pc.if_else(pa.array(use_fit), fit_col, col)
        if name == "Bagpipes_flag" and extra_flag.any():
            col = pc.bit_wise_or(col.fill_null(0), pa.array(extra_flag, col.type))
        out.append(col)
    return pa.Table.from_arrays(out, names=names).cast(base.schema)


def write_staging(ard_dir: Path | str, order: int, pixel: int, table: pa.Table, core: pa.Table) -> Path:
    """Atomically (re)write one staging partition of the layer (``table`` in core-row order)."""
    where = f"layer {NAME}, pixel {pixel} (order {order})"
    conformed = hats_writer.conform_table(table, NAME, where)
    return hats_writer.write_partition(ard_dir, NAME, order, pixel, hats_writer.with_positions(
        conformed, NAME, core.column("RA").to_numpy(), core.column("DEC").to_numpy()))


def restage_partition(ard_dir: Path | str, order: int, pixel: int) -> int:
    """Merge the daemon's fits into the existing staging partition (or NULL rows) and rewrite it.

    Used by the daemon after every checkpoint, so readers see new fits
    without a rebuild. Returns the number of rows with Physics_Source = 'bagpipes'.
    """
    from ard_sql.build.orchestrator import computed_from_another_core, read_built_on, read_state
    from ard_sql.science.pipes_fit import FLAGS, null_row

    core = pq.read_table(paths.partition_file(ard_dir, order, pixel))
    tid = core.column("TargetID").to_numpy()
    staged = paths.partition_file(ard_dir, order, pixel, NAME)
    # the same targets with another Z (the core re-ingested since the layer ran) are stale too
    stale = computed_from_another_core(ard_dir, NAME, order, pixel, read_built_on(ard_dir, NAME),
                                       read_state(ard_dir, paths.CORE))
    if staged.exists() and not stale:
        base = pq.read_table(staged)
        order_of = {int(t): i for i, t in enumerate(base.column("TargetID").to_numpy())}
        if set(order_of) == set(int(t) for t in tid):
            base = base.take(pa.array([order_of[int(t)] for t in tid]))
        else:  # core changed since the layer ran: start from NULL rows that say so; the next build fills them
            base = rows_to_table([null_row(t, FLAGS["NOT_YET_BUILT"], None) for t in tid])
    else:
        base = rows_to_table([null_row(t, FLAGS["NOT_YET_BUILT"], None) for t in tid])
    merged = merge_fits(base, read_fits(ard_dir, order, pixel))
    write_staging(ard_dir, order, pixel, merged, core)
    hats_writer.finalize_catalog(ard_dir, NAME)
    # the ard view reads the compacted table while it is current: keep this partition's current
    from ard_sql.build import compaction

    if paths.partition_file(ard_dir, order, pixel, compaction.WIDE).exists():
        compaction.compact_partition(ard_dir, order, pixel)
    return int(pc.sum(pc.equal(merged.column("Physics_Source"), "bagpipes")).as_py() or 0)


class BagpipesLayer:
    """Amortized posteriors for every galaxy, with the daemon's Bagpipes fits merged over them."""

    name = NAME
    version = "2"  # 2: OUT_OF_TRAINING below the simulated S/N
    #: Options that change how the layer runs, not its rows (the estimator's hash is in the token).
    fingerprint_exempt = ("cache_dir", "batch_size", "sim_workers")
    check_options = staticmethod(options)

    def prepare(self, ard_dir: Path, options_: dict[str, Any], force: bool = False) -> str:
        """Train (or reuse) the amortized estimator; return a token naming its weights."""
        opts = options(options_)
        art = paths.artifact_dir(ard_dir, NAME)
        cache = Path(opts["cache_dir"]).expanduser() if "cache_dir" in opts else art / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        # The cache is content-addressed (simulation and training settings, forward model, bagpipes
        # version), so ``force`` has nothing to redo here; delete the cache folder to retrain.
        est_path, info = train_estimator(cache, opts)
        art.mkdir(parents=True, exist_ok=True)
        target = estimator_file(ard_dir)
        if not target.exists() or _file_hash(target) != _file_hash(est_path):
            with paths.atomic_path(target) as tmp:
                shutil.copyfile(est_path, tmp)
        log_path = art / TRAIN_LOG
        from ard_sql.science import pipes_model as pm

        # the cache key holds the model key, so a cached estimator is always today's model's
        paths.atomic_write_text(log_path, json.dumps({**info, "cache": str(cache), MODEL_KEY_FIELD: pm.model_key()}, indent=1))
        return _file_hash(target)

    def run(self, part: Partition) -> pa.Table:
        """TargetID + the bagpipes columns for every core row of ``part``."""
        opts = options(part.options)
        targetid = part.core.column("TargetID").to_numpy()
        if len(targetid) == 0:
            return rows_to_table([])
        spec = part.spectra()
        if not np.array_equal(spec.targetid, targetid):
            raise ValueError(f"bagpipes layer, pixel {part.pixel}: spectra rows do not match the core rows")
        table = amortized_table(load_estimator(part.ard_dir), part.core, spec.flux, spec.ivar, opts["batch_size"])
        return merge_fits(table, read_fits(part.ard_dir, part.order, part.pixel))

    @staticmethod
    def finalize(ard_dir: Path, options_: dict[str, Any]) -> dict[str, str]:
        """Provenance of the estimator and the count of Bagpipes fits, for ``ard_meta``.

        ``bagpipes_amortized_heldout_coverage68`` is the statistical posterior's (held-out
        simulations are the model itself); ``bagpipes_amortized_model_error`` is the term the
        stored percentiles add to it.
        """
        out: dict[str, str] = {}
        log_path = paths.artifact_dir(ard_dir, NAME) / TRAIN_LOG
        if log_path.exists():
            info = json.loads(log_path.read_text())
            out["bagpipes_amortized_config"] = json.dumps(info.get("config", {}))
            out["bagpipes_amortized_training"] = training_summary(info)
            if "heldout_coverage68" in info:
                out["bagpipes_amortized_heldout_coverage68"] = json.dumps(info["heldout_coverage68"])
            out["bagpipes_amortized_model_error"] = json.dumps(info.get("model_error"))
        n_fit = 0
        for f in (paths.artifact_dir(ard_dir, NAME) / "fits").glob("Norder=*/Dir=*/Npix=*.parquet"):
            n_fit += pq.read_metadata(f).num_rows
        out["bagpipes_fits"] = str(n_fit)
        return out


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
