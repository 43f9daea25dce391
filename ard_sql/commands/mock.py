"""``ard mock``: write a mock DESI survey (DR1 file layout) and its truth table."""

from __future__ import annotations

from pathlib import Path

import typer

from ard_sql.commands._common import console, counting_bar, fail


def mock(
    out: Path = typer.Option(..., "--out", help="Folder to write the survey into (healpix/..., zcatalog, truth.parquet)."),
    n: int = typer.Option(2000, "--n", help="Number of targets (galaxies, plus a few stars and QSOs)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same bytes."),
    area: float = typer.Option(None, "--area", help="Footprint area in deg^2 (default: max(20, n/100))."),
    zmax: float = typer.Option(0.6, "--zmax", help="Highest galaxy redshift."),
    no_truth_spectra: bool = typer.Option(False, "--no-truth-spectra", help="Do not write the noise-free spectra."),
    physics: str = typer.Option("realistic", "--physics", help="Galaxy physics: 'realistic' (published scalings, "
                                "bursts, AGN) or 'prior' (SFH, dust and metallicity drawn from the bagpipes layer's "
                                "priors: a calibration test of its posteriors)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Write a mock DESI survey from real physics (BC03 populations in a Zel'dovich cosmic web).

    The files follow the DESI DR1 data model (coadd + redrock per healpix,
    a zpix catalog), so `ard build OUT --out ARD` ingests them exactly as
    it would real DESI data. OUT/truth.parquet holds every target's true
    parameters, for scoring each derived column.
    """
    from ard_sql.build.mock.survey import MockConfig, run_mock

    cfg = MockConfig(out=out, n=n, seed=seed, area=area, zmax=zmax, truth_spectra=not no_truth_spectra,
                     physics=physics)
    try:
        cfg.validate()
    except ValueError as exc:
        raise fail(str(exc)) from None
    with counting_bar("mock survey (targets)", n, progress) as bar:
        summary = run_mock(cfg, progress=bar)
    console.print(f"wrote {summary['n']} targets in {summary['partitions']} files to {out}")


def register(app: typer.Typer) -> None:
    """Add ``ard mock`` to the app."""
    app.command("mock", short_help="Write a mock DESI survey with its truth table.")(mock)
