"""``ard publish`` and ``ard pull``: Steam-style releases of an ARD (see ``ard_sql.release``)."""

from __future__ import annotations

from pathlib import Path

import typer

from ard_sql.commands._common import console, counting_bar, fail


def publish(
    ard_dir: Path = typer.Argument(..., help="ARD folder to publish."),
    to: Path = typer.Option(..., "--to", help="Release folder; the release is written to RELEASE_DIR/<version>/."),
    version: str = typer.Option(None, "--version", help="Release name (default: the next integer: 1, 2, ...)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Publish an ARD as a versioned release with a checksummed manifest of partitions and columns.

    Files unchanged since the previous release are hard-linked, so a release
    costs only what changed. Serve RELEASE_DIR over HTTP (any static file
    server) or share it as a folder; users then run `ard pull`.
    """
    from ard_sql import release

    try:
        with counting_bar("publishing files", 1, progress) as bar:
            manifest = release.publish(ard_dir, to, version=version, progress=bar)
    except (release.ReleaseError, OSError) as exc:
        raise fail(str(exc)) from None
    size = sum(f["size"] for f in manifest["files"])
    console.print(f"published release {manifest['version']}: {len(manifest['files'])} files, {size / 1e6:.1f} MB, "
                  f"layers {', '.join(sorted(manifest['layers']))} "
                  f"({manifest['hard_linked_from_previous']} unchanged files linked) -> {Path(to) / manifest['version']}")


def pull(
    source: str = typer.Argument(..., help="Release folder or http(s):// URL (or a version folder or its manifest.json)."),
    out: Path = typer.Option(..., "--out", help="ARD folder to install into (created; updated in place on a later release)."),
    layers: list[str] = typer.Option(None, "--layers", help="Layers to fetch, e.g. --layers lick,topology (core always; 'all' for every layer; default: the installed selection, else all)."),
    region: str = typer.Option(None, "--region", help="Sky region: 'CIRCLE ra dec r', 'POLYGON ra1 dec1 ...' or 'MOC ...'; 'all' for the whole sky."),
    version: str = typer.Option(None, "--version", help="Release to install (default: the newest)."),
    jobs: int = typer.Option(4, "--jobs", help="Parallel transfers."),
    retries: int = typer.Option(3, "--retries", help="Retries (resuming where the transfer stopped) per file."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash local files too, and fetch any that do not match."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Fetch a release (only the layers and region asked), verify every sha256, and switch atomically.

    On a later release, only the files whose checksum changed are fetched. A
    failed pull (damaged file, lost connection) leaves the installed ARD as it
    was; run the same command again to resume.
    """
    from ard_sql import release

    try:
        with counting_bar("pulling (bytes)", 1, progress) as bar:
            res = release.pull(source, out, layers=layers or None, region=region, version=version, jobs=jobs,
                               retries=retries, verify=verify, progress=bar)
    except (release.ReleaseError, OSError) as exc:
        raise fail(str(exc)) from None
    was = f" (was {res.previous_version})" if res.previous_version else ""
    console.print(f"installed release {res.version}{was} in {res.ard_dir}: fetched {len(res.fetched)} files "
                  f"({res.bytes_fetched / 1e6:.1f} MB), kept {res.kept}, removed {len(res.removed)}; "
                  f"layers {', '.join(res.layers)}" + (f"; region {res.region}" if res.region else ""))


def register(app: typer.Typer) -> None:
    """Add ``ard publish`` and ``ard pull`` to the app."""
    app.command("publish", short_help="Publish an ARD as a checksummed release.")(publish)
    app.command("pull", short_help="Fetch and verify a release (layers, region).")(pull)
