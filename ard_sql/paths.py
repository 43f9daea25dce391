"""Every path rule of an ARD folder lives here; nothing else builds one by hand.

Layout of an ARD folder (``ARD_DIR``)::

    ard.duckdb                      views, macros, types and the ard_meta table
    build-report.json               what the last build skipped and why
    staging/core/                   HATS catalog of the core table (one row per target)
        hats.properties
        partition_info.csv
        dataset/_metadata
        dataset/_common_metadata
        dataset/Norder=K/Dir=D/Npix=N.parquet
    staging/<layer>/                the same HATS layout, one catalog per layer
        _schema.parquet             zero-row file with the layer's schema, so views always open
    spectra/Norder=K/Dir=D/Npix=N.h5            flux/ivar/mask on the brz grid
    models/<layer>/Norder=K/Dir=D/Npix=N.h5     best-fit model spectra of a layer
    indexes/<embedding>.usearch                 USearch HNSW index per embedding
    artifacts/<layer>/                          layer-wide products (templates, weights, skeleton)
    state/<layer>.json                          fingerprints of finished partitions
    release.json                                the release installed by ``ard pull`` (manifest + selection)
    .pull/                                      ``ard pull``'s download area (never globbed by the views)
        lock                                    one pull at a time
        switch.json                             journal of a switch in progress (rolled forward by the next pull)
        <version>/<relpath>[.part]              verified (or partial) downloads, renamed into place

A release folder (``RELEASE_DIR``, written by ``ard publish``)::

    latest.json                     {"version": ..., "manifests": {version: sha256 of its manifest.json}}
    <version>/manifest.json         files (ARD-relative paths) with sha256, size, layer, order/pixel; columns
    <version>/<relpath>             the files, laid out as in an ARD folder (unchanged ones hard-linked)

Partition pixels are HEALPix NESTED at order ``K``; ``Dir = (N // 10000) * 10000``
as in the HATS standard.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

DB_FILENAME = "ard.duckdb"
REPORT_FILENAME = "build-report.json"
CORE = "core"


def ard_home() -> Path:
    """Return the default ARD folder: ``$ARD_HOME``, else the per-user data folder."""
    env = os.environ.get("ARD_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "ard_sql" / "ard"


def db_path(ard_dir: Path | str) -> Path:
    """The DuckDB file of an ARD folder."""
    return Path(ard_dir) / DB_FILENAME


def report_path(ard_dir: Path | str) -> Path:
    """The build report (JSON) of an ARD folder."""
    return Path(ard_dir) / REPORT_FILENAME


def staging_dir(ard_dir: Path | str, layer: str = CORE) -> Path:
    """The HATS catalog folder of one staging table (``core`` or a layer name)."""
    return Path(ard_dir) / "staging" / layer


def schema_file(ard_dir: Path | str, layer: str) -> Path:
    """Zero-row Parquet file holding a layer's schema (keeps its view typed before it runs)."""
    return staging_dir(ard_dir, layer) / "_schema.parquet"


def pixel_dir_number(pixel: int) -> int:
    """HATS ``Dir`` number of a pixel: ``(N // 10000) * 10000``."""
    return (int(pixel) // 10000) * 10000


def pixel_relpath(order: int, pixel: int, suffix: str = ".parquet") -> Path:
    """Relative path ``Norder=K/Dir=D/Npix=N<suffix>`` of one partition."""
    return Path(f"Norder={int(order)}") / f"Dir={pixel_dir_number(pixel)}" / f"Npix={int(pixel)}{suffix}"


def partition_file(ard_dir: Path | str, order: int, pixel: int, layer: str = CORE) -> Path:
    """Parquet file of one partition of a staging table."""
    return staging_dir(ard_dir, layer) / "dataset" / pixel_relpath(order, pixel)


def spectra_file(ard_dir: Path | str, order: int, pixel: int) -> Path:
    """HDF5 spectra file of one partition."""
    return Path(ard_dir) / "spectra" / pixel_relpath(order, pixel, ".h5")


def spectra_relpath(order: int, pixel: int) -> str:
    """Path of a partition's spectra file relative to the ARD folder (stored in the core table)."""
    return (Path("spectra") / pixel_relpath(order, pixel, ".h5")).as_posix()


def model_file(ard_dir: Path | str, layer: str, order: int, pixel: int) -> Path:
    """HDF5 file of a layer's best-fit model spectra for one partition."""
    return Path(ard_dir) / "models" / layer / pixel_relpath(order, pixel, ".h5")


def index_file(ard_dir: Path | str, embedding: str) -> Path:
    """USearch index file of one embedding column (e.g. ``emb_astro``)."""
    return Path(ard_dir) / "indexes" / f"{embedding}.usearch"


def artifact_dir(ard_dir: Path | str, layer: str) -> Path:
    """Folder for a layer's survey-wide products (templates, weights, skeleton tables)."""
    return Path(ard_dir) / "artifacts" / layer


def state_file(ard_dir: Path | str, layer: str) -> Path:
    """JSON file recording the input fingerprint of each finished partition of a layer."""
    return Path(ard_dir) / "state" / f"{layer}.json"


def temporary_sibling(path: Path | str) -> Path:
    """A unique temporary name beside ``path`` for atomic writes (write there, then ``os.replace``).

    Prefer :func:`atomic_path`, which also renames on success and cleans up on failure.
    """
    path = Path(path)
    # pid + random token: two builds (or two threads of one) writing the same file never share a
    # temporary; the leading dot and ".tmp-" keep it out of globs and releases (release.check_relpath)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a unique temporary sibling of ``target`` to write; on success rename it onto ``target``.

    A reader sees the old file or the new one, never half of one: the body writes (and closes)
    the yielded path, then ``os.replace`` swaps it in. If the body raises, the temporary is
    removed and ``target`` is left as it was. ``suffix`` is appended to the temporary's name
    for writers that insist on an extension (``np.savez`` adds ``.npz`` otherwise). The parent
    folder is created.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    if suffix:
        tmp = tmp.with_name(tmp.name + suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        # BaseException: a Ctrl-C mid-write must not leave a stray temporary either
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path | str, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_path`); ``fsync`` flushes it to disk first."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:  # durability across a power cut, for files others download (releases)
            f.flush()
            os.fsync(f.fileno())
    return Path(target)


def atomic_write_text(target: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically (see :func:`atomic_path`)."""
    return atomic_write_bytes(target, text.encode(encoding))


def bagpipes_fits_file(ard_dir: Path | str, order: int, pixel: int) -> Path:
    """Parquet of the Bagpipes daemon's finished fits (rows of BAGPIPES_COLUMNS) for one partition.

    Kept under ``artifacts/`` (not globbed by the views); the daemon merges
    these rows into ``staging/bagpipes`` after every batch.
    """
    return artifact_dir(ard_dir, "bagpipes") / "fits" / pixel_relpath(order, pixel)


def bagpipes_draws_file(ard_dir: Path | str, order: int, pixel: int) -> Path:
    """Parquet side table of 200 posterior draws per Bagpipes-fitted target of one partition."""
    return artifact_dir(ard_dir, "bagpipes") / "draws" / pixel_relpath(order, pixel)


def bagpipes_workdir(ard_dir: Path | str) -> Path:
    """Working folder of bagpipes itself (its ``pipes/`` tree lands here, never in the cwd)."""
    return artifact_dir(ard_dir, "bagpipes") / "work"


RELEASE_FILENAME = "release.json"
PULL_DIRNAME = ".pull"
RELEASE_MANIFEST = "manifest.json"
RELEASE_LATEST = "latest.json"


def release_file(ard_dir: Path | str) -> Path:
    """The record of the release installed in an ARD folder by ``ard pull``."""
    return Path(ard_dir) / RELEASE_FILENAME


def pull_dir(ard_dir: Path | str) -> Path:
    """``ard pull``'s download area inside an ARD folder (outside ``staging/``, so no view reads it)."""
    return Path(ard_dir) / PULL_DIRNAME


def pull_version_dir(ard_dir: Path | str, version: str) -> Path:
    """Where ``ard pull`` stages the verified files of one release before switching."""
    return pull_dir(ard_dir) / str(version)


def release_version_dir(release_dir: Path | str, version: str) -> Path:
    """One published release: ``RELEASE_DIR/<version>/``."""
    return Path(release_dir) / str(version)


def release_manifest(release_dir: Path | str, version: str) -> Path:
    """The manifest of one published release."""
    return release_version_dir(release_dir, version) / RELEASE_MANIFEST


def release_latest(release_dir: Path | str) -> Path:
    """``RELEASE_DIR/latest.json``: the newest version and the sha256 of every manifest."""
    return Path(release_dir) / RELEASE_LATEST


def parse_pixel_relpath(relpath: str | Path) -> tuple[int, int] | None:
    """(order, pixel) of a path ending in ``Norder=K/Dir=D/Npix=N.<ext>``; None otherwise."""
    parts = Path(relpath).parts
    if len(parts) < 3:
        return None
    n, d, f = parts[-3:]
    if not (n.startswith("Norder=") and d.startswith("Dir=") and f.startswith("Npix=")):
        return None
    try:
        order = int(n.split("=", 1)[1])
        pixel = int(f.split("=", 1)[1].split(".", 1)[0])
    except ValueError:
        return None
    return order, pixel
