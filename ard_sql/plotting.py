"""Plots a researcher asks for first: a spectrum with its models, the quenching diagram, BPT, the sky.

Every function takes an open ARD (``db=``; by default it opens
``ard_sql.open()`` and closes it again before returning), draws with matplotlib, and returns the figure; ``out=`` also saves it (PNG, or any
format matplotlib knows from the suffix). ``ard plot ...`` calls the same
functions from the command line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ard_sql import grid

#: Emission lines labelled on spectra: name -> vacuum rest wavelength (A).
LINE_LABELS: dict[str, float] = {
    "[OII]": 3728.48, "Hδ": 4102.89, "Hγ": 4341.68, "Hβ": 4862.68, "[OIII]": 5008.24,
    "Mg b": 5176.7, "Na D": 5895.6, "Hα": 6564.61, "[NII]": 6585.27, "[SII]": 6725.5,
}
#: Model components stored by the layers (models/<layer>/...h5), and how they are drawn.
MODEL_STYLE: dict[tuple[str, str], dict[str, Any]] = {
    ("ppxf", "stars"): {"color": "tab:red", "label": "pPXF stars"},
    ("ppxf", "gas"): {"color": "tab:green", "label": "pPXF stars + gas"},
    ("bagpipes", "model"): {"color": "tab:purple", "label": "Bagpipes best fit"},
}
WEB_COLOURS = {"Void": "tab:blue", "Sheet": "tab:green", "Filament": "tab:orange", "Knot": "tab:red"}


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            import IPython  # noqa: F401 - in a notebook keep the inline backend
        except ImportError:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def _db(db: Any) -> Iterator[Any]:
    """``db`` itself (left open), or ``ard_sql.open()`` closed when the block ends."""
    if db is not None:
        yield db
        return
    import ard_sql

    with ard_sql.open() as opened:
        yield opened


def _save(fig: Any, out: str | Path | None) -> Any:
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def _ids(target_id: Any) -> list[int]:
    if hasattr(target_id, "tolist"):
        target_id = target_id.tolist()
    if isinstance(target_id, Iterable) and not isinstance(target_id, (str, bytes)):
        return [int(t) for t in target_id]
    return [int(target_id)]


def plot_spectrum(target_id: Any, show_model: bool = True, *, db: Any = None, max_panels: int = 4,
                  smooth: int = 5, out: str | Path | None = None) -> Any:
    """Flux with its 1-sigma band, the pPXF and Bagpipes models when present, and labelled lines.

    ``target_id`` is one TargetID or several (a list, a pandas Series such
    as ``neighbours.TargetID``): one panel each, at most ``max_panels``.
    ``smooth`` is a boxcar width in pixels for display only.
    """
    from ard_sql import spectra_store
    from ard_sql.udfs.spectrum import target_locator

    plt = _pyplot()
    ids = _ids(target_id)[:max_panels]
    if not ids:
        raise ValueError("plot_spectrum: no target given")
    fig, axes = plt.subplots(len(ids), 1, figsize=(11, 3.2 * len(ids)), squeeze=False)
    wave = grid.brz_wavelength()
    kernel = np.ones(smooth) / smooth
    with _db(db) as con:
        # one TargetID lookup (a read of the core table) for every model of every panel
        locator = target_locator(con.path) if show_model else None
        for ax, tid in zip(axes[:, 0], ids):
            row = con.sql("SELECT spectrum(TargetID) AS s, Z, SPECTYPE, SNR_Median FROM ard WHERE TargetID = ?", [tid]).fetchall()
            if not row or row[0][0] is None:
                raise ValueError(f"plot_spectrum: target {tid} is not in the ARD at {con.path}")
            spec, z, spectype, snr = row[0]
            flux = np.asarray(spec["flux"], float)
            ivar = np.asarray(spec["ivar"], float)
            good = ivar > 0
            f = np.where(good, flux, np.nan)
            err = np.where(good, 1 / np.sqrt(np.where(good, ivar, 1)), np.nan)
            fs = np.convolve(np.nan_to_num(f), kernel, "same")
            es = np.convolve(np.nan_to_num(err), kernel, "same") / np.sqrt(smooth)
            ax.fill_between(wave, fs - es, fs + es, color="0.75", lw=0, label="1σ")
            ax.plot(wave, fs, color="k", lw=0.6, label="flux")
            if show_model:
                for (layer, comp), style in MODEL_STYLE.items():
                    models = spectra_store.read_model(con.path, layer, tid, locator=locator)
                    if models and comp in models and np.isfinite(models[comp]).any():
                        m = models[comp] if comp != "gas" else models[comp] + models.get("stars", 0)
                        ax.plot(wave, m, lw=0.9, **style)
            if z is not None and np.isfinite(z):
                top = np.nanpercentile(fs[good], 99.5) if good.any() else 1.0
                for name, lam in LINE_LABELS.items():
                    obs = lam * (1 + z)
                    if wave[0] < obs < wave[-1]:
                        ax.axvline(obs, color="tab:blue", lw=0.4, alpha=0.5)
                        ax.text(obs, top, name, rotation=90, fontsize=7, va="top", ha="right", color="tab:blue")
            ax.set_title(f"TargetID {tid}   {spectype}   z = {z:.4f}   S/N = {snr:.1f}", fontsize=9)
            ax.set_ylabel(r"$F_\lambda$ [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ Å$^{-1}$]", fontsize=8)
            ax.legend(fontsize=7, loc="upper right", ncol=4)
            if good.any():
                lo, hi = np.nanpercentile(fs[good], [0.5, 99.8])
                ax.set_ylim(min(lo, 0) - 0.1 * (hi - lo), hi + 0.25 * (hi - lo))
    axes[-1, 0].set_xlabel("observed wavelength (vacuum) [Å]")
    fig.tight_layout()
    return _save(fig, out)


def plot_quenching_diagram(*, db: Any = None, where: str | None = None, out: str | Path | None = None) -> Any:
    """Dn4000 against HdeltaA for the galaxies (optionally filtered with ``db.query`` syntax)."""
    plt = _pyplot()
    with _db(db) as con:
        galaxies = "SPECTYPE == 'GALAXY'"  # stars and QSOs have Lick indices too, but no place on this diagram
        df = con.query(galaxies if where is None else f"{galaxies} & ({where})",
                       ["TargetID", "Dn4000", "Hdelta_A", "SNR_Median"]).dropna()
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(df.Dn4000, df.Hdelta_A, c=np.log10(df.SNR_Median.clip(lower=0.1)), s=4, cmap="viridis")
    fig.colorbar(sc, label="log10 S/N")
    ax.set_xlabel(r"D$_n$4000")
    ax.set_ylabel(r"H$\delta_A$ [Å]")
    ax.set_xlim(0.8, 2.4)
    ax.set_ylim(-6, 12)
    ax.set_title(f"Quenching diagram ({len(df)} galaxies)")
    return _save(fig, out)


def _rows(con: Any, where: str | None, columns: list[str]) -> Any:
    """``columns`` of every ``ard`` row, or of those passing ``where`` (``db.query`` syntax), as a DataFrame."""
    if where is None:
        return con.sql("SELECT " + ", ".join(f'"{c}"' for c in columns) + " FROM ard").df()
    return con.query(where, columns)


def plot_bpt(*, db: Any = None, min_snr: float = 3.0, where: str | None = None, out: str | Path | None = None) -> Any:
    """[NII]-BPT diagram with the Kauffmann et al. (2003) and Kewley et al. (2001) lines (optionally filtered with
    ``db.query`` syntax)."""
    plt = _pyplot()
    names = ["Hbeta", "OIII_5007", "Halpha", "NII_6584"]
    with _db(db) as con:
        df = _rows(con, where, [f"{n}_Flux{e}" for n in names for e in ("", "_err")])
    ok = np.ones(len(df), bool)
    for n in names:
        ok &= (df[f"{n}_Flux"] / df[f"{n}_Flux_err"] > min_snr).fillna(False).to_numpy()
    d = df[ok]
    x = np.log10(d.NII_6584_Flux / d.Halpha_Flux)
    y = np.log10(d.OIII_5007_Flux / d.Hbeta_Flux)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(x, y, s=4, color="k")
    xs = np.linspace(-2, 0.0, 200)
    ax.plot(xs[xs < 0.05], 0.61 / (xs[xs < 0.05] - 0.05) + 1.3, "b--", label="Kauffmann+03")
    xk = np.linspace(-2, 0.4, 200)
    ax.plot(xk[xk < 0.47], 0.61 / (xk[xk < 0.47] - 0.47) + 1.19, "r-", label="Kewley+01")
    ax.set_xlim(-2, 1)
    ax.set_ylim(-1.5, 1.5)
    ax.set_xlabel(r"log [NII]6584 / H$\alpha$")
    ax.set_ylabel(r"log [OIII]5007 / H$\beta$")
    ax.legend(fontsize=8)
    ax.set_title(f"BPT ({len(d)} galaxies, all four lines S/N > {min_snr:g})")
    return _save(fig, out)


def plot_sky(*, db: Any = None, where: str | None = None, out: str | Path | None = None) -> Any:
    """Targets on the sky coloured by Web_Class (grey: no class), optionally filtered with ``db.query`` syntax."""
    plt = _pyplot()
    with _db(db) as con:
        df = _rows(con, where, ["RA", "DEC", "Web_Class"])
    df["web"] = df.pop("Web_Class").astype("string")
    fig, ax = plt.subplots(figsize=(7, 5))
    none = df.web.isna()
    ax.scatter(df.RA[none], df.DEC[none], s=2, color="0.7", label="no class")
    for name, colour in WEB_COLOURS.items():
        sel = df.web == name
        ax.scatter(df.RA[sel], df.DEC[sel], s=2, color=colour, label=f"{name} ({int(sel.sum())})")
    ax.invert_xaxis()
    ax.set_xlabel("RA [deg]")
    ax.set_ylabel("Dec [deg]")
    ax.legend(fontsize=7, markerscale=4)
    ax.set_title("Targets by cosmic-web class")
    return _save(fig, out)


__all__ = ["plot_spectrum", "plot_quenching_diagram", "plot_bpt", "plot_sky"]
