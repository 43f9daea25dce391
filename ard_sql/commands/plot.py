"""``ard plot``: the standard figures of an ARD, saved as PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from ard_sql.commands._common import console, fail, open_ard

KINDS = ("spectrum", "quenching", "bpt", "sky")


def plot(
    ard_dir: Path = typer.Argument(..., help="ARD folder."),
    kind: str = typer.Argument(..., help="spectrum, quenching, bpt or sky."),
    target: list[int] = typer.Option([], "--target", help="TargetID (repeatable) for `spectrum`."),
    out: Path = typer.Option(Path("plot.png"), "--out", help="Image file to write (PNG, PDF, SVG by suffix)."),
    no_model: bool = typer.Option(False, "--no-model", help="`spectrum`: leave out the pPXF and Bagpipes models."),
    where: str = typer.Option(None, "--where", help="`quenching`, `bpt`, `sky`: a db.query filter, e.g. \"Z < 0.3 & SNR_Median > 5\"."),
) -> None:
    """Draw a spectrum with its models, the quenching diagram (Dn4000-HdeltaA), the BPT diagram or the sky by Web_Class."""
    from ard_sql import plotting

    if kind not in KINDS:
        raise fail(f"unknown plot {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "spectrum" and not target:
        raise fail("`ard plot ARD spectrum` needs at least one --target TARGETID")
    if kind == "spectrum" and where is not None:
        raise fail("--where selects galaxies for quenching, bpt and sky; `spectrum` plots the --target galaxies")
    db = open_ard(ard_dir)
    with db:
        try:
            if kind == "spectrum":
                plotting.plot_spectrum(target, show_model=not no_model, db=db, out=out)
            elif kind == "quenching":
                plotting.plot_quenching_diagram(db=db, where=where, out=out)
            elif kind == "bpt":
                plotting.plot_bpt(db=db, where=where, out=out)
            else:
                plotting.plot_sky(db=db, where=where, out=out)
        except ValueError as exc:
            raise fail(str(exc)) from None
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add ``ard plot`` to the app."""
    app.command("plot", short_help="Spectrum, quenching, BPT or sky-by-Web_Class plots.")(plot)
