"""``ard build``: ingest DESI files and run the layers into an ARD folder."""

from __future__ import annotations

from pathlib import Path

import typer

from ard_sql.commands._common import console, fail


def build(
    source: Path = typer.Argument(None, help="Folder of DESI coadd/redrock files (searched recursively). "
                                            "Leave out to run layers on an existing ARD."),
    out: Path = typer.Option(..., "--out", help="ARD folder to create or update."),
    layers: str = typer.Option(None, "--layers", help="Comma-separated layers to run (e.g. lick,ppxf); "
                                                     "default: every available layer; 'core' for the ingest only."),
    workers: int = typer.Option(None, "--workers", help="Local worker processes (default: CPU count)."),
    scheduler: str = typer.Option("processes", "--scheduler",
                                  help="'processes', 'threads', 'sync', or a dask scheduler address (tcp://host:8786)."),
    keep_going: bool = typer.Option(False, "--keep-going", help="Exit 0 even when inputs were skipped (they are in build-report.json)."),
    zcat: Path = typer.Option(None, "--zcat", help="zpix/zall catalog whose ZCAT_PRIMARY picks each target's primary spectrum."),
    order: int = typer.Option(None, "--order", help="HEALPix order of the partitions (0-6); default: chosen from the counts."),
    force: bool = typer.Option(False, "--force", help="Rebuild every partition, even unchanged ones."),
    set_: list[str] = typer.Option([], "--set", help="Layer option layer.key=value (repeatable), e.g. --set ppxf.mode=fast."),
    ppxf_mode: str = typer.Option(None, "--ppxf-mode", metavar="fast|reference",
                                  help="pPXF layer: the batched fitter (fast, the default) or pPXF itself (reference); "
                                       "the same as --set ppxf.mode=MODE."),
    astroclip_checkpoint: Path = typer.Option(None, "--astroclip-checkpoint", metavar="PATH",
                                              help="embed layer: published AstroCLIP SpecFormer weights (a local "
                                                   "file; nothing is fetched) for emb_astro instead of training; the "
                                                   "same as --set embed.astroclip_checkpoint=PATH."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Build (or update) an ARD: ingest, layers, then ard.duckdb and build-report.json.

    Re-running skips partitions whose inputs did not change. A bad input file
    is skipped with a message naming it and why; NaN flux, negative ivar and
    a duplicate row are repaired (pixels masked, first row kept) and named the
    same way. Either makes the exit code 1 unless --keep-going. A layer that
    fails as a whole keeps its previous data and makes the exit code 1.
    """
    from ard_sql.build.options import BuildOptions, OptionError
    from ard_sql.build.orchestrator import FAILED, BuildFailed
    from ard_sql.build.orchestrator import build as run_build

    wanted = None if layers is None else [x.strip() for x in layers.split(",") if x.strip()]
    try:
        opts = BuildOptions(out=str(out), source=str(source) if source else None, layers=wanted, workers=workers,
                            scheduler=scheduler, keep_going=keep_going, zcat=str(zcat) if zcat else None,
                            order=order, force=force, progress=progress)
        for assignment in set_:
            opts.set(assignment)
        if ppxf_mode is not None:
            from ard_sql.build.layers.ppxf import MODES

            if ppxf_mode not in MODES:
                raise OptionError("--ppxf-mode must be " + " or ".join(map(repr, MODES)) + f", got {ppxf_mode!r}")
            opts.set(f"ppxf.mode={ppxf_mode}")
        if astroclip_checkpoint is not None:
            if not astroclip_checkpoint.is_file():
                raise OptionError(f"--astroclip-checkpoint {astroclip_checkpoint}: no such file")
            opts.layer_options.setdefault("embed", {})["astroclip_checkpoint"] = str(astroclip_checkpoint.resolve())
    except OptionError as exc:
        raise fail(str(exc)) from None
    try:
        report = run_build(opts)
    except (BuildFailed, FileNotFoundError, ConnectionError) as exc:
        raise fail(str(exc)) from None
    for problem in report.problems:
        console.print(str(problem), style="red" if problem.severity == "error" else "yellow", highlight=False)
    for name, info in report.layers.items():
        console.print(f"{name}: {info}", highlight=False)
    console.print(f"ARD written to {out} ({len(report.errors)} errors, {len(report.repaired_inputs)} repaired inputs; "
                  f"see {out}/build-report.json)")
    failed = [name for name, info in report.layers.items() if info.get("status") == FAILED]
    if failed:  # a crashed layer is not a skipped input: --keep-going does not cover it
        console.print(f"[bold red]error:[/] layer(s) {', '.join(failed)} failed and kept their previous data; "
                      f"see {out}/build-report.json", highlight=False)
        raise typer.Exit(1)
    if (report.errors or report.repaired_inputs) and not keep_going:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``ard build`` to the app."""
    app.command("build", short_help="Build or update an ARD from DESI files or a mock.")(build)
