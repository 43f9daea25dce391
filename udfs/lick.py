"""SQL functions ``lick(targetid)`` and ``lick_spectrum(wavelength, flux, ivar, z)``.

Both return ``STRUCT(Dn4000 DOUBLE, Dn4000_err DOUBLE, ..., Lick_flag INTEGER)``:
every index of :mod:`ard_sql.science.lick` with its error (NULL when not
measured) and the flag bitmask (see ``ard_sql.science.lick.FLAGS``).

- ``lick(targetid)`` measures the stored spectrum of a target (HDF5 store, brz
  grid) at the core table's redshift ``Z``; NULL for a NULL or unknown id.
- ``lick_spectrum(wavelength, flux, ivar, z)`` measures any spectrum given as
  arrays (observed-frame vacuum Angstrom; ``ivar <= 0`` marks bad pixels), e.g.
  ``lick_spectrum(s.wavelength, s.flux, s.ivar, Z)`` with ``s = spectrum(TargetID)``.
  NULL when an argument is NULL or the arrays' lengths differ.

Both are Arrow-vectorised: DuckDB hands a batch of rows, measured in one call
of :func:`ard_sql.science.lick.measure_indices` (spectra sharing a wavelength
grid form one batch).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from ard_sql import grid, paths
from ard_sql.contract import LICK_COLUMNS
from ard_sql.science import lick
from ard_sql.udfs import create_function

if TYPE_CHECKING:  # pragma: no cover
    from ard_sql.connection import ARD

#: SQL functions this module registers: name -> (signature, one line for ``ard_functions``).
SQL_FUNCTIONS: dict[str, tuple[str, str]] = {
    "lick": ("lick(targetid BIGINT)", "every Lick index with its error and the flag, measured on the stored spectrum"),
    "lick_spectrum": ("lick_spectrum(wavelength DOUBLE[], flux DOUBLE[], ivar DOUBLE[], z DOUBLE)",
                      "the same for any spectrum given as arrays"),
}

RETURN_TYPE = "STRUCT(" + ", ".join(f"{c.name} {c.type}" for c in LICK_COLUMNS[1:]) + ")"
_STRUCT_TYPE = pa.struct(list(lick.lick_arrow_schema())[1:])


def _to_struct(result: dict[str, np.ndarray], valid: np.ndarray) -> pa.StructArray:
    """STRUCT array from a (full-length) measurement dict; rows not ``valid`` are NULL."""
    table = lick.to_arrow(np.zeros(len(valid), dtype=np.int64), result)
    return pa.StructArray.from_arrays(
        [table.column(f.name).combine_chunks() for f in _STRUCT_TYPE], fields=list(_STRUCT_TYPE), mask=pa.array(~valid)
    )


def _empty_result(n: int) -> dict[str, np.ndarray]:
    out = {name: np.full(n, np.nan) for name in lick.output_names()}
    out["Lick_flag"] = np.zeros(n, dtype=np.int32)
    return out


class RedshiftLookup:
    """Sorted TargetID -> Z table from the core staging table (loaded once)."""

    def __init__(self, ard_dir: Path | str) -> None:
        dataset = paths.staging_dir(ard_dir, paths.CORE) / "dataset"
        files = sorted(str(p) for p in dataset.rglob("Npix=*.parquet")) if dataset.exists() else []
        if files:
            t = ds.dataset(files, format="parquet").to_table(columns=["TargetID", "Z"])
            ids = t.column("TargetID").to_numpy().astype(np.int64)
            z = t.column("Z").to_numpy().astype(np.float64)
        else:
            ids, z = np.zeros(0, np.int64), np.zeros(0)
        order = np.argsort(ids, kind="stable")
        self.ids, self.z = ids[order], z[order]

    def __call__(self, targetids: np.ndarray) -> np.ndarray:
        """Z of each id (NaN for an unknown id)."""
        out = np.full(len(targetids), np.nan)
        if len(self.ids):
            pos = np.clip(np.searchsorted(self.ids, targetids), 0, len(self.ids) - 1)
            hit = self.ids[pos] == targetids
            out[hit] = self.z[pos[hit]]
        return out


class LickFunction:
    """The vectorised body of ``lick(targetid)``, bound to one ARD folder."""

    def __init__(self, ard: "ARD") -> None:
        from ard_sql.udfs.spectrum import SpectrumFunction

        self.ard = ard
        self._spectra = ard.cache.get("spectrum")
        if self._spectra is None:
            self._spectra = ard.cache["spectrum"] = SpectrumFunction(ard.path)
        self._z: RedshiftLookup | None = None
        self._lock = threading.Lock()
        self._wave = grid.brz_wavelength()

    def redshift(self, ids: np.ndarray) -> np.ndarray:
        """Core-table Z of each id, the lookup loaded on first use."""
        with self._lock:
            if self._z is None:
                self._z = RedshiftLookup(self.ard.path)
        return self._z(ids)

    def __call__(self, targetid: pa.Array) -> pa.Array:
        targetid = _array(targetid)
        ids = np.asarray(targetid.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        found, flux, ivar, mask = self._spectra.read(ids)
        found &= targetid.is_valid().to_numpy(zero_copy_only=False)
        result = _empty_result(len(ids))
        rows = np.flatnonzero(found)
        if len(rows):
            sub = lick.measure_indices(self._wave, flux[rows], ivar[rows], self.redshift(ids[rows]), mask[rows])
            for name, values in sub.items():
                result[name][rows] = values
        return _to_struct(result, found)


def _array(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous Arrow array: DuckDB hands Arrow UDFs ``ChunkedArray`` arguments."""
    if isinstance(arr, pa.ChunkedArray):
        return arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return arr


def _list_values(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, float64 child values) of a list array; ``offsets`` index into the values."""
    arr = arr.cast(pa.list_(pa.float64()))
    offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=np.float64)
    return offsets, values


def _rows(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """(len(rows), size) block of list rows that all have ``size`` elements."""
    return values[(offsets[rows][:, None] + np.arange(size)).ravel()].reshape(len(rows), size)


_BRZ = grid.brz_wavelength()


def _snap_to_brz(wave: np.ndarray) -> np.ndarray:
    """The exact (float64) brz grid when ``wave`` is that grid rounded (``spectrum()`` gives FLOAT).

    A float32 wavelength is off by up to 5e-4 A; on noisy spectra that moves an EW by
    ~0.01 A, so ``lick_spectrum(spectrum(id)...)`` would not equal ``lick(id)``. Any
    other grid is used as given.
    """
    if wave.size == _BRZ.size and np.max(np.abs(wave - _BRZ)) < 2e-3:
        return _BRZ
    return wave


def lick_spectrum(wavelength: pa.Array, flux: pa.Array, ivar: pa.Array, z: pa.Array) -> pa.Array:
    """Vectorised body of ``lick_spectrum``: rows sharing a wavelength grid are measured together.

    A row is NULL when an argument is NULL, the three arrays differ in length, or
    its wavelengths are not strictly increasing.
    """
    wavelength, flux, ivar, z = (_array(a) for a in (wavelength, flux, ivar, z))
    n = len(wavelength)
    valid = np.ones(n, dtype=bool)
    for arr in (wavelength, flux, ivar, z):
        valid &= arr.is_valid().to_numpy(zero_copy_only=False)
    wo, wv = _list_values(wavelength)
    fo, fv = _list_values(flux)
    io, iv = _list_values(ivar)
    length = np.diff(wo)
    valid &= (np.diff(fo) == length) & (np.diff(io) == length) & (length >= 2)
    zz = np.asarray(z.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
    result = _empty_result(n)
    measured = np.zeros(n, dtype=bool)
    rows = np.flatnonzero(valid)
    # Group rows by grid length, then by identical grids (usually one group: the brz grid).
    # Rows are grouped by the bytes of their grid (a dict: linear in the rows; np.unique
    # with axis=0 sorts whole rows and cost seconds per 2048-row batch).
    for size in np.unique(length[rows]):
        sel = rows[length[rows] == size]
        block = _rows(wv, wo, sel, size)
        groups: dict[bytes, list[int]] = {}
        for k in range(len(sel)):
            groups.setdefault(block[k].tobytes(), []).append(k)
        for members in groups.values():
            part = sel[members]
            wave = _snap_to_brz(block[members[0]])
            if not np.all(np.diff(wave) > 0):
                continue
            sub = lick.measure_indices(wave, _rows(fv, fo, part, size), _rows(iv, io, part, size), zz[part])
            for name, values in sub.items():
                result[name][part] = values
            measured[part] = True
    return _to_struct(result, measured)


def register(con: duckdb.DuckDBPyConnection, ard: "ARD") -> None:
    """Register ``lick(BIGINT)`` and ``lick_spectrum(DOUBLE[], DOUBLE[], DOUBLE[], DOUBLE)``."""
    body = ard.cache.get("lick")
    if body is None:
        body = ard.cache["lick"] = LickFunction(ard)
    create_function(con, ard, "lick", body, ["BIGINT"], RETURN_TYPE, type="arrow", null_handling="special")
    create_function(con, ard, "lick_spectrum", lick_spectrum, ["DOUBLE[]", "DOUBLE[]", "DOUBLE[]", "DOUBLE"],
                    RETURN_TYPE, type="arrow", null_handling="special")
