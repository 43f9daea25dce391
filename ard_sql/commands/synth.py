"""``ard synth-catalog``: a catalog-only ARD of any size, to exercise the query path at DR1 scale."""

from __future__ import annotations

from pathlib import Path

import typer

from ard_sql.commands._common import console, counting_bar, fail


def synth_catalog(
    out: Path = typer.Option(..., "--out", help="ARD folder to write."),
    n: int = typer.Option(1_000_000, "--n", help="Number of targets (rows of the core table)."),
    order: int = typer.Option(3, "--order", help="HEALPix order of the partitions."),
    seed: int = typer.Option(42, "--seed", help="Random seed."),
    embed_fraction: float = typer.Option(0.0, "--embed-fraction", help="Fraction of partitions given embedding vectors."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Write a catalog-only ARD (every contract column, no spectra) through the same writers and views as a build.

    Memory is bounded by one partition, so --n 10000000 runs on a small machine.
    The values are plausible and mutually consistent, not physics: use `ard mock`
    and `ard build` for science checks.
    """
    from ard_sql.build.synth_catalog import SynthOptions
    from ard_sql.build.synth_catalog import synth_catalog as run

    if n < 1 or not 0 <= order <= 6 or not 0 <= embed_fraction <= 1:
        raise fail("--n must be >= 1, --order 0-6 and --embed-fraction in [0, 1]")
    with counting_bar("synthetic partitions", 1, progress) as bar:
        counts = run(out, SynthOptions(n=n, order=order, seed=seed, embed_fraction=embed_fraction), progress=bar)
    console.print(f"wrote {out}: {counts}")


def register(app: typer.Typer) -> None:
    """Add ``ard synth-catalog`` to the app."""
    app.command("synth-catalog", short_help="Write a catalog-only ARD for scale tests.")(synth_catalog)
