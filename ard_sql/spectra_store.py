"""The HDF5 spectra store: one file per partition, one object per chunk.

Each ``spectra/Norder=K/Dir=D/Npix=N.h5`` file holds, for the ``n`` targets of
one partition, in the order of ``SPEC_ROW`` in the core table:

``targetid``  (n,) int64
``flux``      (n, NPIX) float32, 1e-17 erg/s/cm2/A on the brz grid
``ivar``      (n, NPIX) float32, 0 where a pixel is bad or masked
``mask``      (n, NPIX) uint32 DESI mask bits (0 = good)
``lsf_sigma`` (NPIX,) float32 instrumental Gaussian sigma (Angstrom), partition mean
``wavelength`` (NPIX,) float64 vacuum Angstrom (the brz grid, kept for readers without ard_sql)

Chunks are one row (one object), gzip-compressed with the shuffle filter, so
reading one spectrum decompresses only that object. Best-fit model spectra of
a layer live beside them in ``models/<layer>/...h5`` with ``targetid`` and one
(n, NPIX) float32 dataset per model component.

Every write goes to a temporary name in the same folder and is then renamed,
so a reader sees either the old file or the new one.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import h5py
import numpy as np

from ard_sql import grid, paths
from ard_sql.build.layers.base import SpectraBatch

if TYPE_CHECKING:  # pragma: no cover - udfs.spectrum imports this module
    from ard_sql.udfs.spectrum import TargetLocator

FORMAT_VERSION = "1"
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def _write_rows(h5: h5py.File, name: str, data: np.ndarray, dtype: str) -> None:
    data = np.ascontiguousarray(data, dtype=dtype)
    chunks = (1, data.shape[1]) if data.shape[0] > 0 else None
    h5.create_dataset(name, data=data, chunks=chunks, **(_COMPRESSION if chunks else {}))


def write_partition(
    ard_dir: Path | str,
    order: int,
    pixel: int,
    targetid: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray,
    lsf_sigma: np.ndarray,
) -> Path:
    """Write (atomically) the spectra file of one partition and return its path.

    Rows are stored in the given order; that order is what ``SPEC_ROW`` in the
    core table refers to.
    """
    targetid = np.asarray(targetid, dtype=np.int64)
    n = len(targetid)
    for name, arr in (("flux", flux), ("ivar", ivar), ("mask", mask)):
        if np.shape(arr) != (n, grid.NPIX):
            raise ValueError(f"{name} has shape {np.shape(arr)}, expected ({n}, {grid.NPIX})")
    if np.shape(lsf_sigma) != (grid.NPIX,):
        raise ValueError(f"lsf_sigma has shape {np.shape(lsf_sigma)}, expected ({grid.NPIX},)")
    path = paths.spectra_file(ard_dir, order, pixel)
    with paths.atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["order"] = int(order)
        h5.attrs["pixel"] = int(pixel)
        h5.attrs["flux_unit"] = "1e-17 erg / (s cm2 Angstrom)"
        h5.create_dataset("targetid", data=targetid)
        h5.create_dataset("wavelength", data=grid.brz_wavelength())
        h5.create_dataset("lsf_sigma", data=np.asarray(lsf_sigma, dtype=np.float32))
        _write_rows(h5, "flux", flux, "float32")
        _write_rows(h5, "ivar", ivar, "float32")
        _write_rows(h5, "mask", mask, "uint32")
    return path


def _row_order(stored: np.ndarray, wanted: np.ndarray, where: Path) -> np.ndarray:
    """Rows of ``stored`` holding each of ``wanted`` (KeyError naming the first missing one)."""
    if len(wanted) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(stored) == 0:
        raise KeyError(f"{where}: target {int(wanted[0])} is not in this spectra file (it is empty)")
    sorter = np.argsort(stored, kind="stable")
    pos = np.clip(np.searchsorted(stored, wanted, sorter=sorter), 0, len(stored) - 1)
    rows = sorter[pos]
    bad = stored[rows] != wanted
    if np.any(bad):
        raise KeyError(f"{where}: target {int(wanted[bad][0])} is not in this spectra file")
    return rows


def _read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read rows in any order (h5py wants increasing, unique indices)."""
    if len(rows) == 0:
        return np.empty((0,) + ds.shape[1:], dtype=ds.dtype)
    uniq, inverse = np.unique(rows, return_inverse=True)
    if len(uniq) > 0.5 * ds.shape[0]:
        data = ds[...]  # most of the file: one sequential read beats many chunk lookups
        return data[rows]
    # One chunk (one object) per row, read straight into place: h5py's fancy indexing
    # (ds[list]) costs about twice as much per row.
    out = np.empty((len(uniq),) + ds.shape[1:], dtype=ds.dtype)
    for i, r in enumerate(uniq):
        ds.read_direct(out, np.s_[int(r):int(r) + 1], np.s_[i:i + 1])
    return out[inverse]


def read_partition(ard_dir: Path | str, order: int, pixel: int, targetids: Iterable[int]) -> SpectraBatch:
    """Return the spectra of ``targetids`` (in that order) from one partition's file."""
    path = paths.spectra_file(ard_dir, order, pixel)
    if not path.exists():
        raise FileNotFoundError(f"no spectra file for partition Norder={order} Npix={pixel}: {path}")
    wanted = np.asarray(list(targetids) if not isinstance(targetids, np.ndarray) else targetids, dtype=np.int64)
    with h5py.File(path, "r") as h5:
        rows = _row_order(h5["targetid"][...], wanted, path)
        return SpectraBatch(
            targetid=wanted,
            wave=grid.brz_wavelength(),
            flux=_read_rows(h5["flux"], rows),
            ivar=_read_rows(h5["ivar"], rows),
            mask=_read_rows(h5["mask"], rows),
            lsf_sigma=h5["lsf_sigma"][...].astype(np.float32),
        )


class SpectraReader:
    """Reads rows from spectra files, keeping a few files open (for the ``spectrum`` UDF)."""

    def __init__(self, ard_dir: Path | str, max_open: int = 64) -> None:
        self.ard_dir = Path(ard_dir)
        self.max_open = max_open
        self._files: OrderedDict[str, h5py.File] = OrderedDict()
        self._ids: dict[str, tuple[h5py.File, np.ndarray]] = {}

    def _file(self, spec_file: str) -> h5py.File:
        h5 = self._files.pop(spec_file, None)
        if h5 is None:
            h5 = h5py.File(self.ard_dir / spec_file, "r")
            while len(self._files) >= self.max_open:
                name, old = self._files.popitem(last=False)
                self._ids.pop(name, None)
                old.close()
        self._files[spec_file] = h5
        return h5

    def verified_rows(self, spec_file: str, targetids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found): ``rows`` checked against the file's own ``targetid`` column.

        ``SPEC_ROW`` of the core table is a hint: a row that does not hold the
        wanted target (a spectra file rewritten by a rebuild whose core file
        was not, e.g. after a crash between the two renames) is looked up by
        TargetID instead; a target the file does not hold is not found.
        """
        h5 = self._file(spec_file)
        stored = self._ids.get(spec_file)
        if stored is None or stored[0] is not h5:
            stored = self._ids[spec_file] = (h5, h5["targetid"][...])
        ids = stored[1]
        targetids = np.asarray(targetids, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64).copy()
        ok = (rows >= 0) & (rows < len(ids))
        ok[ok] = ids[rows[ok]] == targetids[ok]
        if not ok.all() and len(ids):
            sorter = np.argsort(ids, kind="stable")
            bad = np.flatnonzero(~ok)
            pos = sorter[np.clip(np.searchsorted(ids, targetids[bad], sorter=sorter), 0, len(ids) - 1)]
            hit = ids[pos] == targetids[bad]
            rows[bad[hit]] = pos[hit]
            ok[bad[hit]] = True
        return rows, ok

    def read(self, spec_file: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (flux, ivar, mask) of ``rows`` of one file, in the given row order."""
        h5 = self._file(spec_file)
        rows = np.asarray(rows, dtype=np.int64)
        return _read_rows(h5["flux"], rows), _read_rows(h5["ivar"], rows), _read_rows(h5["mask"], rows)

    def close(self) -> None:
        """Close every open file."""
        self._ids.clear()
        while self._files:
            self._files.popitem()[1].close()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


def read_spectra(ard_dir: Path | str, spec_file: str, rows: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (flux, ivar, mask) for ``rows`` of ``spec_file`` (relative to the ARD folder)."""
    reader = SpectraReader(ard_dir, max_open=1)
    try:
        return reader.read(spec_file, np.asarray(list(rows), dtype=np.int64))
    finally:
        reader.close()


# ---------------------------------------------------------------- best-fit models

_PIXEL_RE = re.compile(r"Norder=(\d+)/Dir=\d+/Npix=(\d+)\.")


def parse_partition(relpath: str) -> tuple[int, int]:
    """(order, pixel) from a path containing ``Norder=K/Dir=D/Npix=N.<ext>``."""
    m = _PIXEL_RE.search(Path(relpath).as_posix())
    if not m:
        raise ValueError(f"{relpath!r} is not a partition path (Norder=K/Dir=D/Npix=N)")
    return int(m.group(1)), int(m.group(2))


def write_models(
    ard_dir: Path | str,
    layer: str,
    order: int,
    pixel: int,
    targetids: np.ndarray,
    models: Mapping[str, np.ndarray],
) -> Path:
    """Write (atomically) a layer's best-fit model spectra for one partition.

    ``models`` maps a component name (e.g. ``"model"``, ``"stars"``, ``"gas"``)
    to an (n, NPIX) array on the brz grid; rows follow ``targetids``. A row of
    NaN means "no model for this target" (failed fit).
    """
    targetids = np.asarray(targetids, dtype=np.int64)
    n = len(targetids)
    path = paths.model_file(ard_dir, layer, order, pixel)
    with paths.atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["layer"] = layer
        h5.create_dataset("targetid", data=targetids)
        for name, arr in models.items():
            if np.shape(arr) != (n, grid.NPIX):
                raise ValueError(f"model {name!r} has shape {np.shape(arr)}, expected ({n}, {grid.NPIX})")
            _write_rows(h5, name, arr, "float32")
    return path


def read_model(
    ard_dir: Path | str, layer: str, targetid: int, *, locator: TargetLocator | None = None
) -> dict[str, np.ndarray] | None:
    """Best-fit model components of one target from ``layer``, or None when there is none.

    The partition is found from the core table (``SPEC_FILE``). Reading that
    is a scan of every core partition: pass ``locator``
    (``ard_sql.udfs.spectrum.target_locator(ard_dir)``) to read several models
    with one scan.
    """
    from ard_sql.udfs.spectrum import target_locator

    if locator is None:
        locator = target_locator(ard_dir)
    loc = locator.locate(np.array([targetid], dtype=np.int64))
    spec_file = loc.spec_file(0)
    if spec_file is None:
        return None
    order, pixel = parse_partition(spec_file)
    path = paths.model_file(ard_dir, layer, order, pixel)
    if not path.exists():
        return None
    with h5py.File(path, "r") as h5:
        ids = h5["targetid"][...]
        hit = np.flatnonzero(ids == int(targetid))
        if len(hit) == 0:
            return None
        row = int(hit[0])
        return {name: h5[name][row] for name in h5.keys() if name != "targetid"}
