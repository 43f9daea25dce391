"""Steam-style distribution of an ARD: ``ard publish`` and ``ard pull``.

A *release* is a frozen, checksummed copy of an ARD's data files; a user
pulls only the layers and sky region they ask for, and a later release
updates only the files that changed.

Decisions
---------

Release folder (``ard publish ARD_DIR --to RELEASE_DIR``; layout in ``ard_sql.paths``)

- ``RELEASE_DIR/<version>/`` holds the files under their ARD-relative paths
  (``staging/<layer>/dataset/Norder=K/Dir=D/Npix=N.parquet``, ``spectra/...h5``,
  ``models/<layer>/...``, ``indexes/*.usearch``, ``artifacts/<layer>/...``,
  ``build-report.json``) and ``manifest.json``. A file whose sha256 equals the
  previous release's is hard-linked, not copied (copy where links fail), so a
  new release costs only what changed. The folder is written under a hidden
  temporary name and renamed, so a half-written release is never visible.
- Not published: ``ard.duckdb`` (it holds absolute paths; the puller writes
  its own, from the provenance in the manifest, with its own ard_sql's SQL),
  the catalog-level HATS files (``_metadata``, ``partition_info.csv``,
  ``hats.properties``: they are rewritten by ``finalize_catalog`` from the
  partitions actually pulled, so a partial pull is still a valid HATS
  catalog), ``_schema.parquet`` (regenerated from the contract), ``state/``
  (build bookkeeping), ``artifacts/bagpipes/work`` (a scratch folder), and
  hidden or temporary files.
- ``manifest.json``: ``format``, ``version``, ``previous``, ``created``,
  ``ard_sql_version``, ``provenance`` (the build's ``ard_meta`` provenance),
  ``layers`` (per layer: files, bytes, rows, partition orders, and for the
  contract tables the ``columns`` with type and unit from ``ard_sql.contract``),
  and ``files``: one entry per file with ``path``, ``sha256``, ``size``,
  ``layer``, ``kind`` (partition, spectra, model, index, artifact, meta),
  ``order``/``pixel`` for per-partition files and ``rows`` for Parquet partitions.
- ``RELEASE_DIR/latest.json``: the newest version, the list of versions and
  the sha256 of every version's ``manifest.json`` (a pull that goes through
  it verifies the manifest too). Versions default to 1, 2, 3, ...

Selection (``ard pull SOURCE --out ARD_DIR --layers ... --region ...``)

- Layers are the manifest's ``layer`` values: the contract tables (``core``,
  ``lick``, ``ppxf``, ``bagpipes``, ``embed``, ``topology``), ``spectra``, and
  any other artifact folder (e.g. ``synth``). ``core`` is always pulled (every
  view joins on it). Model spectra ``models/<layer>/`` come with ``<layer>``
  only when ``spectra`` is pulled too (they exist to be drawn over a spectrum).
  Default: every layer.
- ``--region`` (``'CIRCLE ra dec r'``, ``'POLYGON ...'``, ``'MOC ...'``) keeps
  the per-partition files (anything under ``Norder=K/Dir=D/Npix=N``) whose pixel
  is in ``Region.pixels_at(order)``, the same test as
  ``ard_sql.regions.partition_files``; survey-wide files (USearch indexes,
  layer artifacts) of the selected layers are pulled whole.
- The selection is stored in ``ARD_DIR/release.json``; a later pull without
  ``--layers``/``--region`` keeps it (``--layers all`` / ``--region all`` widen it).

Transfer, verification and the switch

- SOURCE is a release folder or an ``http(s)://`` URL of one (the newest
  version, or ``--version``), a version folder, or a ``manifest.json``. HTTP
  uses ``urllib`` only; every file is downloaded into
  ``ARD_DIR/.pull/<version>/<path>.part``, resumed with ``Range: bytes=N-``
  after a dropped connection (a server that answers 200 restarts it from 0),
  retried ``retries`` times with a short back-off, and checked for size and
  sha256 before it loses its ``.part``. A checksum mismatch discards the file
  and downloads it once more from scratch; a second mismatch fails the pull.
  Parallel transfers: ``jobs`` threads.
- Nothing in ARD_DIR outside ``.pull/`` changes until *every* selected file is
  verified. A failed pull (corrupt file, server gone, Ctrl-C) leaves the
  installed release exactly as it was; verified and partial downloads stay
  in ``.pull/`` so the next pull only fetches what is missing.
- The switch: a journal (``.pull/switch.json``: the new ``release.json``, the
  files to move in and to delete) is written atomically first; then each file
  is renamed into place (``os.replace``: a reader sees the old file or the
  new one), files that left the selection or the release are deleted, the
  catalog-level HATS files are rewritten, ``ard.duckdb`` is rewritten
  (atomically, absolute paths to ARD_DIR, so ``ard_sql.open()`` and the plain
  DuckDB shell both work), and ``release.json`` is written last. If the
  process dies during the switch, every file is still readable and the old
  ``ard.duckdb`` opens; the next pull rolls the journal forward before it does
  anything else.
- Update: a file is fetched only when its sha256 differs from the one
  recorded in ``release.json`` for that path, or the local file is missing or
  has the wrong size (``verify=True`` re-hashes local files too).
- ``pull`` refuses a folder that holds an ARD not installed by ``ard pull``
  (a local build), and a release whose columns do not cover this ard_sql's
  contract for a selected layer (its views would not open).
- One pull at a time per ARD folder (``fcntl`` lock on ``.pull/lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from ard_sql import contract, paths

FORMAT = "ard-release/1"
CHUNK = 1 << 20
#: Top-level names a manifest may place files under (anything else is refused).
PUBLISHED_TOP = ("staging", "spectra", "models", "indexes", "artifacts", paths.REPORT_FILENAME)
#: Folders under ``artifacts/`` that are scratch space, never published.
SCRATCH_DIRS = (("artifacts", "bagpipes", "work"),)
SPECTRA = "spectra"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Progress = Callable[[int, int], None]


class ReleaseError(RuntimeError):
    """A release cannot be published or pulled (the message says why)."""


class ChecksumError(ReleaseError):
    """A downloaded file does not match the sha256 (or size) of the manifest."""


class TransferError(ReleaseError):
    """A file could not be downloaded after every retry."""


# ----------------------------------------------------------------- helpers
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    paths.atomic_write_bytes(path, data, fsync=True)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def _ard_sql_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("ard_sql")
    except md.PackageNotFoundError:
        return "unknown"


def check_version(version: str) -> str:
    """Return ``version`` if it is a valid release name (letters, digits, ``._-``)."""
    version = str(version)
    if not _VERSION_RE.match(version) or version.endswith(".json") or version in {".", ".."}:
        raise ReleaseError(f"release version {version!r}: use letters, digits, '.', '_' or '-' (e.g. 3 or 2025.1)")
    return version


def check_relpath(path: str) -> str:
    """Refuse manifest paths that could leave the ARD folder or land outside the published trees."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or any(part in {"", ".", ".."} or part.startswith(".") for part in p.parts):
        raise ReleaseError(f"manifest path {path!r} is not a plain relative path")
    if p.parts[0] not in PUBLISHED_TOP or (p.parts[0] == paths.REPORT_FILENAME and len(p.parts) > 1):
        raise ReleaseError(f"manifest path {path!r} is outside the published folders ({', '.join(PUBLISHED_TOP)})")
    return path


def _index_layer(stem: str) -> str:
    for layer, cols in contract.LAYER_COLUMNS.items():
        if any(c.name.lower() == stem.lower() for c in cols):
            return layer
    return "embed"


def classify(relpath: str) -> tuple[str, str] | None:
    """(layer, kind) of an ARD-relative path that ``publish`` ships; None for files it leaves out."""
    parts = PurePosixPath(relpath).parts
    if not parts or any(p.startswith(".") or ".tmp-" in p or p.endswith(".part") for p in parts):
        return None
    top = parts[0]
    if relpath == paths.REPORT_FILENAME:
        return paths.CORE, "meta"
    if top == "staging" and len(parts) >= 3:
        if parts[2] == "dataset" and parts[-1].endswith(".parquet") and paths.parse_pixel_relpath(relpath):
            return parts[1], "partition"
        return None
    if top == "spectra" and paths.parse_pixel_relpath(relpath):
        return SPECTRA, "spectra"
    if top == "models" and len(parts) >= 3:
        return parts[1], "model"
    if top == "indexes" and len(parts) == 2 and parts[1].endswith(".usearch"):
        return _index_layer(PurePosixPath(parts[1]).stem), "index"
    if top == "artifacts" and len(parts) >= 3:
        if any(parts[: len(s)] == s for s in SCRATCH_DIRS):
            return None
        return parts[1], "artifact"
    return None


@dataclass
class FileEntry:
    """One file of a release."""

    path: str
    sha256: str
    size: int
    layer: str
    kind: str
    order: int | None = None
    pixel: int | None = None
    rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON form of this entry (fields that are None left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FileEntry":
        """Parse and check one manifest entry; a malformed one is a ReleaseError."""
        try:
            e = cls(path=check_relpath(str(d["path"])), sha256=str(d["sha256"]).lower(), size=int(d["size"]),
                    layer=str(d["layer"]), kind=str(d["kind"]), order=d.get("order"), pixel=d.get("pixel"), rows=d.get("rows"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseError(f"manifest file entry {d!r} is malformed: {exc}") from None
        if not re.fullmatch(r"[0-9a-f]{64}", e.sha256) or e.size < 0:
            raise ReleaseError(f"manifest entry {e.path}: bad sha256 or size")
        return e


def _contract_columns(layer: str) -> list[dict[str, str]]:
    return [{"name": c.name, "type": c.type, "unit": c.unit} for c in contract.columns(layer)]


def check_manifest(manifest: dict[str, Any]) -> list[FileEntry]:
    """Validate a parsed manifest and return its file entries."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ReleaseError(f"not an ARD release manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    check_version(manifest.get("version", ""))
    entries = [FileEntry.from_dict(d) for d in manifest.get("files", [])]
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            raise ReleaseError(f"manifest lists {e.path} twice")
        seen.add(e.path)
    return entries


# ----------------------------------------------------------------- publish
def _publishable(ard_dir: Path) -> Iterator[tuple[str, str, str]]:
    for top in PUBLISHED_TOP:
        root = ard_dir / top
        if root.is_file():
            got = classify(top)
            if got:
                yield top, *got
            continue
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            if f.is_file() and not f.is_symlink():
                rel = f.relative_to(ard_dir).as_posix()
                got = classify(rel)
                if got:
                    yield rel, *got


def read_latest(release_dir: Path | str) -> dict[str, Any] | None:
    """``latest.json`` of a local release folder (None when it has none)."""
    p = paths.release_latest(release_dir)
    return json.loads(p.read_text()) if p.exists() else None


def _next_version(release_dir: Path) -> str:
    nums = [int(d.name) for d in release_dir.iterdir() if d.is_dir() and d.name.isdigit()] if release_dir.is_dir() else []
    return str(max(nums, default=0) + 1)


def _copy_hashing(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for chunk in iter(lambda: fi.read(CHUNK), b""):
            h.update(chunk)
            fo.write(chunk)
    shutil.copystat(src, dst)
    return h.hexdigest()


def publish(ard_dir: Path | str, release_dir: Path | str, version: str | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Publish the data files of ``ard_dir`` as ``release_dir/<version>/``; return the manifest.

    Unchanged files (same path and sha256 as the previous release) are
    hard-linked from it. ``latest.json`` is updated last.
    """
    from ard_sql.build import database

    ard_dir = Path(ard_dir).resolve()
    release_dir = Path(release_dir).resolve()
    if not paths.db_path(ard_dir).exists() or not paths.staging_dir(ard_dir).is_dir():
        raise ReleaseError(f"{ard_dir} is not an ARD folder (no ard.duckdb or staging/core); build one first")
    if release_dir == ard_dir or ard_dir in release_dir.parents:
        raise ReleaseError("--to must be outside the ARD folder")
    release_dir.mkdir(parents=True, exist_ok=True)
    latest = read_latest(release_dir)
    version = check_version(version) if version else _next_version(release_dir)
    final = paths.release_version_dir(release_dir, version)
    if final.exists():
        raise ReleaseError(f"release {version} already exists in {release_dir}; choose another --version")
    prev_version = latest.get("version") if latest else None
    prev: dict[str, FileEntry] = {}
    if prev_version and paths.release_manifest(release_dir, prev_version).exists():
        prev_manifest = json.loads(paths.release_manifest(release_dir, prev_version).read_text())
        prev = {e.path: e for e in check_manifest(prev_manifest)}

    files = list(_publishable(ard_dir))
    if not any(kind == "partition" and layer == paths.CORE for _, layer, kind in files):
        raise ReleaseError(f"{ard_dir} has no core partition to publish")
    tmp = paths.temporary_sibling(final)  # unique: two publishers never share a staging folder
    entries: list[FileEntry] = []
    linked = 0
    try:
        for i, (rel, layer, kind) in enumerate(files):
            src, dst = ard_dir / rel, tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            old = prev.get(rel)
            digest = None
            if old is not None and old.size == src.stat().st_size:
                digest = sha256_file(src)
                old_file = paths.release_version_dir(release_dir, prev_version) / rel
                if digest == old.sha256 and old_file.exists():
                    try:
                        os.link(old_file, dst)
                        linked += 1
                    except OSError:
                        digest = None
                else:
                    digest = None
            if digest is None or not dst.exists():
                digest = _copy_hashing(src, dst)
            pix = paths.parse_pixel_relpath(rel)
            rows = None
            if kind == "partition":
                import pyarrow.parquet as pq

                rows = pq.read_metadata(dst).num_rows
            entries.append(FileEntry(rel, digest, dst.stat().st_size, layer, kind,
                                     pix[0] if pix else None, pix[1] if pix else None, rows))
            if progress:
                progress(i + 1, len(files))
        layers: dict[str, dict[str, Any]] = {}
        for e in entries:
            info = layers.setdefault(e.layer, {"files": 0, "bytes": 0, "rows": 0, "orders": []})
            info["files"] += 1
            info["bytes"] += e.size
            info["rows"] += e.rows or 0
            if e.order is not None and e.order not in info["orders"]:
                info["orders"].append(e.order)
        for layer, info in layers.items():
            info["orders"].sort()
            if layer in contract.LAYER_COLUMNS:
                info["columns"] = _contract_columns(layer)
        prov = database.read_provenance(ard_dir)
        manifest = {
            "format": FORMAT,
            "version": version,
            "previous": prev_version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ard_sql_version": _ard_sql_version(),
            "provenance": dataclasses.asdict(prov) if prov else {},
            "hard_linked_from_previous": linked,
            "layers": layers,
            "files": [e.to_dict() for e in entries],
        }
        data = _json_bytes(manifest)
        _atomic_write_bytes(data, tmp / paths.RELEASE_MANIFEST)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    versions = list((latest or {}).get("versions", []))
    manifests = dict((latest or {}).get("manifests", {}))
    versions.append(version)
    manifests[version] = hashlib.sha256(data).hexdigest()
    _atomic_write_bytes(_json_bytes({"format": FORMAT, "version": version, "versions": versions, "manifests": manifests}),
                        paths.release_latest(release_dir))
    return manifest


# ----------------------------------------------------------------- sources
class NotFound(ReleaseError):
    """The source has no such file."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (408, 429) or exc.code >= 500
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return False
    return isinstance(exc, (OSError, http.client.HTTPException, TransferError))


class Source:
    """Where a release is read from: a folder or an HTTP(S) base URL."""

    def __init__(self, base: str, timeout: float = 30.0) -> None:
        self.base = base
        self.timeout = timeout
        self.is_http = base.startswith(("http://", "https://"))

    def child(self, sub: str) -> "Source":
        """The source of a sub-folder (``sub`` is URL-quoted for HTTP)."""
        if self.is_http:
            return Source(self.base.rstrip("/") + "/" + urllib.parse.quote(sub), self.timeout)
        return Source(str(Path(self.base) / sub), self.timeout)

    def describe(self, rel: str = "") -> str:
        """The URL or path of ``rel`` under this source, for messages."""
        if self.is_http:
            return self.base.rstrip("/") + ("/" + urllib.parse.quote(rel, safe="/=") if rel else "")
        return str(Path(self.base) / rel) if rel else self.base

    def read_bytes(self, rel: str) -> bytes:
        """Whole small file (a manifest); NotFound when it is absent."""
        if not self.is_http:
            p = Path(self.base) / rel
            if not p.is_file():
                raise NotFound(f"{p} not found")
            return p.read_bytes()
        try:
            with urllib.request.urlopen(self.describe(rel), timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise NotFound(f"{self.describe(rel)}: 404") from None
            raise ReleaseError(f"{self.describe(rel)}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise ReleaseError(f"cannot read {self.describe(rel)}: {exc}") from None

    @contextlib.contextmanager
    def open_at(self, rel: str, start: int) -> Iterator[tuple[BinaryIO, int]]:
        """A stream of ``rel`` from byte ``start`` if the source can (else from 0), and that offset."""
        if not self.is_http:
            with open(Path(self.base) / rel, "rb") as f:
                f.seek(start)
                yield f, start
            return
        req = urllib.request.Request(self.describe(rel))
        if start:
            req.add_header("Range", f"bytes={start}-")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            got = 0
            if start and resp.status == 206:
                m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start:
                    raise TransferError(f"{self.describe(rel)}: server answered an unexpected range")
                got = start
            yield resp, got


def _fetch(source: Source, entry: FileEntry, dest: Path, retries: int, tick: Callable[[int], None]) -> None:
    """Download one file to ``dest`` (via ``dest.part``, resumable), verifying size and sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if dest.stat().st_size == entry.size and sha256_file(dest) == entry.sha256:
            tick(entry.size)
            return
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    failures = mismatches = 0
    while True:
        try:
            have = part.stat().st_size if part.exists() else 0
            if have > entry.size:
                part.unlink()
                have = 0
            if have < entry.size or not part.exists():
                with source.open_at(entry.path, have) as (stream, start):
                    with open(part, "r+b" if part.exists() else "wb") as out:
                        out.seek(start)
                        out.truncate()
                        tick(start - have)
                        written = start
                        for chunk in iter(lambda: stream.read(CHUNK), b""):
                            written += len(chunk)
                            if written > entry.size:
                                break
                            out.write(chunk)
                            tick(len(chunk))
                if written < entry.size:
                    raise TransferError(f"{source.describe(entry.path)}: connection closed after {written} of {entry.size} bytes")
            size = part.stat().st_size
            if size != entry.size or sha256_file(part) != entry.sha256:
                part.unlink(missing_ok=True)
                tick(-min(size, entry.size))
                mismatches += 1
                if mismatches > 1:
                    raise ChecksumError(f"{entry.path}: the downloaded bytes do not match the manifest's sha256 "
                                        f"(size {size}, expected {entry.size}); the release on the server is damaged")
                continue
            os.replace(part, dest)
            return
        except ChecksumError:
            raise
        except BaseException as exc:  # noqa: BLE001 - sorted out just below
            if not isinstance(exc, Exception) or not _transient(exc):
                if isinstance(exc, urllib.error.HTTPError):
                    raise TransferError(f"{source.describe(entry.path)}: HTTP {exc.code}") from None
                if isinstance(exc, FileNotFoundError):
                    raise TransferError(f"{source.describe(entry.path)}: not found in the release") from None
                raise
            failures += 1
            if failures > retries:
                raise TransferError(f"{source.describe(entry.path)}: transfer failed after {failures} attempts: {exc}") from exc
            time.sleep(min(0.2 * failures, 2.0))


# ----------------------------------------------------------------- pull
@dataclass
class PullResult:
    """What one pull did."""

    version: str
    previous_version: str | None
    ard_dir: Path
    layers: list[str]
    region: str | None
    fetched: list[str] = field(default_factory=list)
    kept: int = 0
    removed: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    rolled_forward: bool = False


def read_installed(ard_dir: Path | str) -> dict[str, Any] | None:
    """The ``release.json`` of an ARD folder installed by ``ard pull`` (None when there is none)."""
    p = paths.release_file(ard_dir)
    return json.loads(p.read_text()) if p.exists() else None


def resolve_source(source: str | Path, version: str | None = None, timeout: float = 30.0) -> tuple[Source, dict[str, Any]]:
    """(version source, parsed manifest) for SOURCE: release folder/URL, version folder/URL, or manifest."""
    text = str(source)
    if not text.startswith(("http://", "https://")):
        text = str(Path(text).expanduser().resolve())
    if text.endswith(".json"):
        if text.startswith(("http://", "https://")):
            base, _, name = text.rpartition("/")
        else:
            base, name = str(Path(text).parent), Path(text).name
        src = Source(base, timeout)
        manifest = json.loads(src.read_bytes(name))
    else:
        root = Source(text, timeout)
        try:
            latest = json.loads(root.read_bytes(paths.RELEASE_LATEST))
        except NotFound:
            latest = None
        if latest is not None:
            v = check_version(version or latest.get("version", ""))
            src = root.child(v)
            try:
                raw = src.read_bytes(paths.RELEASE_MANIFEST)
            except NotFound:
                raise ReleaseError(f"release {v} not found at {root.describe()} (versions: {', '.join(latest.get('versions', []))})") from None
            want = latest.get("manifests", {}).get(v)
            if want and hashlib.sha256(raw).hexdigest() != want:
                raise ChecksumError(f"{src.describe(paths.RELEASE_MANIFEST)} does not match the sha256 in latest.json")
            manifest = json.loads(raw)
        else:
            src = root
            try:
                manifest = json.loads(src.read_bytes(paths.RELEASE_MANIFEST))
            except NotFound:
                raise ReleaseError(f"{root.describe()} is not an ARD release (no latest.json or manifest.json)") from None
    check_manifest(manifest)
    if version and manifest["version"] != version:
        raise ReleaseError(f"{source} holds release {manifest['version']}, not {version}")
    return src, manifest


@contextlib.contextmanager
def _lock(ard_dir: Path) -> Iterator[None]:
    d = paths.pull_dir(ard_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "lock", "a+") as f:
        try:
            import fcntl

            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ReleaseError(f"another `ard pull` is working on {ard_dir}") from None
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def _prune_empty_dirs(path: Path, stop: Path) -> None:
    path = path.parent
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


_CATALOG_FILES = ("partition_info.csv", "hats.properties", "properties", "dataset/_metadata", "dataset/_common_metadata")


def _rebuild(ard_dir: Path, record: dict[str, Any]) -> None:
    """Catalog-level HATS files from the partitions present, then ``ard.duckdb``."""
    from ard_sql.build import database, hats_writer

    for layer in contract.LAYER_COLUMNS:
        if hats_writer.partition_files(ard_dir, layer):
            hats_writer.finalize_catalog(ard_dir, layer)
        else:
            for name in _CATALOG_FILES:
                (paths.staging_dir(ard_dir, layer) / name).unlink(missing_ok=True)
    known = {f.name for f in dataclasses.fields(database.Provenance)}
    prov = database.Provenance(**{k: v for k, v in (record.get("provenance") or {}).items() if k in known})
    prov.extra = {str(k): str(v) for k, v in prov.extra.items()}
    prov.extra.update({"release_version": str(record["version"]), "release_source": str(record.get("source", "")),
                       "release_layers": ",".join(record["selection"]["layers"] or ["all"]),
                       "release_region": record["selection"].get("region") or ""})
    database.write_database(ard_dir, prov)


def _finish_switch(ard_dir: Path, journal: dict[str, Any]) -> None:
    """Apply a switch journal: move staged files in, delete dropped files, rebuild, write release.json."""
    record = journal["record"]
    staged = paths.pull_version_dir(ard_dir, record["version"])
    for rel in journal["moves"]:
        src, dst = staged / rel, ard_dir / rel
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    for rel in journal["removals"]:
        p = ard_dir / check_relpath(rel)
        p.unlink(missing_ok=True)
        _prune_empty_dirs(p, ard_dir)
    _rebuild(ard_dir, record)
    _atomic_write_bytes(_json_bytes(record), paths.release_file(ard_dir))
    (paths.pull_dir(ard_dir) / "switch.json").unlink(missing_ok=True)
    shutil.rmtree(staged, ignore_errors=True)


def _selected(entries: Iterable[FileEntry], layers: set[str], region: Any) -> list[FileEntry]:
    cache: dict[int, set[int]] = {}
    out = []
    for e in entries:
        if e.layer not in layers or (e.kind == "model" and SPECTRA not in layers):
            continue
        if region is not None and e.order is not None and e.pixel is not None:
            if e.order not in cache:
                cache[e.order] = {int(p) for p in region.pixels_at(int(e.order))}
            if int(e.pixel) not in cache[e.order]:
                continue
        out.append(e)
    return out


def _check_columns(manifest: dict[str, Any], layers: Iterable[str]) -> None:
    for layer in layers:
        if layer not in contract.LAYER_COLUMNS:
            continue
        cols = manifest.get("layers", {}).get(layer, {}).get("columns")
        if cols is None:
            continue
        have = {(c["name"].lower(), c["type"]) for c in cols}
        missing = [c.name for c in contract.columns(layer) if (c.name.lower(), c.type) not in have]
        if missing:
            raise ReleaseError(f"release {manifest['version']} (ard_sql {manifest.get('ard_sql_version')}) lacks columns "
                               f"{', '.join(missing[:8])} of layer {layer} as this ard_sql defines them; "
                               "install the ard_sql version that made the release")


def pull(source: str | Path, ard_dir: Path | str, layers: Iterable[str] | None = None, region: str | None = None,
         version: str | None = None, jobs: int = 4, retries: int = 3, timeout: float = 30.0, verify: bool = False,
         progress: Progress | None = None) -> PullResult:
    """Install (or update to) a release in ``ard_dir``; only the selected, changed files travel.

    ``layers``: manifest layers to keep (``core`` is always added; None keeps the
    installed selection, else every layer; ``["all"]`` means every layer).
    ``region``: a region string (``'CIRCLE ra dec r'``...), ``"all"`` for the
    whole sky, None to keep the installed selection. Raises :class:`ReleaseError`
    (``ChecksumError``, ``TransferError``) with the ARD untouched on failure.
    """
    from ard_sql import regions

    ard_dir = Path(ard_dir).expanduser().resolve()
    ard_dir.mkdir(parents=True, exist_ok=True)
    src, manifest = resolve_source(source, version, timeout)
    entries = check_manifest(manifest)
    new_version = manifest["version"]
    with _lock(ard_dir):
        rolled = False
        journal_path = paths.pull_dir(ard_dir) / "switch.json"
        if journal_path.exists():
            _finish_switch(ard_dir, json.loads(journal_path.read_text()))
            rolled = True
        installed = read_installed(ard_dir)
        if installed is None and (paths.db_path(ard_dir).exists() or paths.staging_dir(ard_dir).exists()):
            raise ReleaseError(f"{ard_dir} holds an ARD that `ard pull` did not install; pull into an empty folder")
        old_sel = (installed or {}).get("selection", {})
        available = sorted({e.layer for e in entries})
        if layers is None:
            asked = old_sel.get("layers")  # None: every layer, including layers new in this release
        else:
            asked = set()
            for item in layers:
                asked |= {x.strip() for x in str(item).split(",") if x.strip()}
            asked = None if "all" in asked else sorted(asked)
        chosen = set(available) if asked is None else set(asked)
        unknown = sorted(chosen - set(available) - {paths.CORE})
        if unknown:
            raise ReleaseError(f"release {new_version} has no layer {', '.join(unknown)}; it has {', '.join(available)}")
        chosen = (chosen & set(available)) | {paths.CORE}
        region_text = old_sel.get("region") if region is None else (None if region.strip().lower() == "all" else region.strip())
        try:
            reg = regions.parse_region(region_text) if region_text else None
        except ValueError as exc:
            raise ReleaseError(str(exc)) from None
        _check_columns(manifest, chosen)
        wanted = _selected(entries, chosen, reg)

        old_files = {e["path"]: e for e in (installed or {}).get("files", [])}
        fetch, keep = [], []
        for e in wanted:
            old = old_files.get(e.path)
            local = ard_dir / e.path
            same = old is not None and old.get("sha256") == e.sha256 and local.is_file() and local.stat().st_size == e.size
            if same and verify:
                same = sha256_file(local) == e.sha256
            (keep if same else fetch).append(e)
        wanted_paths = {e.path for e in wanted}
        removals = sorted(p for p in old_files if p not in wanted_paths)

        for d in paths.pull_dir(ard_dir).iterdir():
            if d.is_dir() and d.name != new_version:
                shutil.rmtree(d, ignore_errors=True)
        staged = paths.pull_version_dir(ard_dir, new_version)
        total = sum(e.size for e in fetch)
        done = [0]
        mutex = threading.Lock()

        def tick(n: int) -> None:
            with mutex:
                done[0] += n
                if progress:
                    progress(max(0, done[0]), total)

        if fetch:
            with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
                futures = [pool.submit(_fetch, src, e, staged / e.path, retries, tick) for e in fetch]
                errors = []
                for fut in futures:
                    try:
                        fut.result()
                    except BaseException as exc:  # noqa: BLE001 - collect, report the first
                        errors.append(exc)
                        for other in futures:
                            other.cancel()
                if errors:
                    raise errors[0]
        record = {
            "format": FORMAT,
            "version": new_version,
            "installed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": src.describe(),
            "selection": {"layers": None if asked is None else sorted(chosen), "region": region_text},
            "ard_sql_version": manifest.get("ard_sql_version"),
            "provenance": manifest.get("provenance", {}),
            "layers": manifest.get("layers", {}),
            "files": [e.to_dict() for e in wanted],
        }
        journal = {"record": record, "moves": [e.path for e in fetch], "removals": removals}
        _atomic_write_bytes(_json_bytes(journal), journal_path)
        _finish_switch(ard_dir, journal)
    return PullResult(new_version, (installed or {}).get("version"), ard_dir, sorted(chosen), region_text,
                      fetched=[e.path for e in fetch], kept=len(keep), removed=removals, bytes_fetched=total,
                      rolled_forward=rolled)
