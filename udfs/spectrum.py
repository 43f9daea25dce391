"""``spectrum(targetid)``: a target's spectrum from the HDF5 store, as a STRUCT.

Returns ``STRUCT(wavelength FLOAT[7781], flux FLOAT[7781], ivar FLOAT[7781], mask UINTEGER[7781])``
on the brz grid (vacuum Angstrom; flux in 1e-17 erg/s/cm2/A), NULL for a NULL
or unknown TargetID. The function is vectorised: DuckDB hands it an Arrow
array of ids, which are located with one ``searchsorted`` in a sorted
TargetID -> (file, row) table, grouped by file and read chunk by chunk.
The table is loaded lazily, once per ``ard_sql.open()``, from the core
table's ``SPEC_FILE``/``SPEC_ROW`` columns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ard_sql import grid, paths
from ard_sql.spectra_store import SpectraReader
from ard_sql.udfs import create_function

if TYPE_CHECKING:  # pragma: no cover
    from ard_sql.connection import ARD

#: SQL functions this module registers: name -> (signature, one line for ``ard_functions``).
SQL_FUNCTIONS: dict[str, tuple[str, str]] = {
    "spectrum": ("spectrum(targetid BIGINT)", "the target's spectrum from the HDF5 store: STRUCT(wavelength, flux, "
                 "ivar, mask) on the brz grid; NULL for an unknown id"),
}

# Fixed-size arrays (every spectrum is on the brz grid): DuckDB moves them about twice as
# fast as variable-length lists, and they cast implicitly to lists where a function wants one.
RETURN_TYPE = (f"STRUCT(wavelength FLOAT[{grid.NPIX}], flux FLOAT[{grid.NPIX}], ivar FLOAT[{grid.NPIX}], "
               f"mask UINTEGER[{grid.NPIX}])")
_ARROW_TYPE = pa.struct(
    [
        ("wavelength", pa.list_(pa.float32(), grid.NPIX)),
        ("flux", pa.list_(pa.float32(), grid.NPIX)),
        ("ivar", pa.list_(pa.float32(), grid.NPIX)),
        ("mask", pa.list_(pa.uint32(), grid.NPIX)),
    ]
)


@dataclass
class Location:
    """Where each of a batch of targets lives (``file_code`` -1: unknown target)."""

    file_code: np.ndarray
    row: np.ndarray
    files: list[str]

    def spec_file(self, i: int) -> str | None:
        """Spectra file (relative to the ARD folder) of the i-th target, or None."""
        code = int(self.file_code[i])
        return None if code < 0 else self.files[code]


class TargetLocator:
    """Sorted TargetID -> (spectra file, row) table of one ARD, from the core table."""

    def __init__(self, targetid: np.ndarray, file_code: np.ndarray, row: np.ndarray, files: list[str]) -> None:
        order = np.argsort(targetid, kind="stable")
        self.targetid = targetid[order]
        self.file_code = file_code[order]
        self.row = row[order]
        self.files = files

    @classmethod
    def from_core(cls, ard_dir: Path | str) -> "TargetLocator":
        """Read TargetID, SPEC_FILE, SPEC_ROW from every core partition file."""
        dataset = paths.staging_dir(ard_dir, paths.CORE) / "dataset"
        files = sorted(dataset.rglob("Npix=*.parquet")) if dataset.exists() else []
        ids, codes, rows, names = [], [], [], []
        index: dict[str, int] = {}
        for f in files:
            t = pq.read_table(f, columns=["TargetID", "SPEC_FILE", "SPEC_ROW"])
            spec = t.column("SPEC_FILE").combine_chunks().dictionary_encode()
            local = [index.setdefault(s, len(index)) for s in spec.dictionary.to_pylist()]
            codes.append(np.asarray(local, dtype=np.int32)[spec.indices.to_numpy(zero_copy_only=False)])
            ids.append(t.column("TargetID").to_numpy())
            rows.append(t.column("SPEC_ROW").to_numpy())
        names = list(index)
        if not ids:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty.astype(np.int32), empty, names)
        return cls(np.concatenate(ids).astype(np.int64), np.concatenate(codes), np.concatenate(rows).astype(np.int64), names)

    def locate(self, targetids: np.ndarray) -> Location:
        """Locate a batch of ids; unknown ones get ``file_code`` -1."""
        targetids = np.asarray(targetids, dtype=np.int64)
        code = np.full(len(targetids), -1, dtype=np.int32)
        row = np.zeros(len(targetids), dtype=np.int64)
        if len(self.targetid):
            pos = np.clip(np.searchsorted(self.targetid, targetids), 0, len(self.targetid) - 1)
            hit = self.targetid[pos] == targetids
            code[hit] = self.file_code[pos[hit]]
            row[hit] = self.row[pos[hit]]
        return Location(code, row, self.files)


def target_locator(ard_dir: Path | str) -> TargetLocator:
    """A fresh locator for ``ard_dir`` (reads the core table)."""
    return TargetLocator.from_core(ard_dir)


class SpectrumFunction:
    """The vectorised body of ``spectrum()``, bound to one ARD folder."""

    def __init__(self, ard_dir: Path | str) -> None:
        self.ard_dir = Path(ard_dir)
        self._locator: TargetLocator | None = None
        self._reader = SpectraReader(self.ard_dir)
        self._lock = threading.Lock()
        self._wave = grid.brz_wavelength().astype(np.float32)

    @property
    def locator(self) -> TargetLocator:
        """The TargetID lookup, loaded on first use."""
        if self._locator is None:
            self._locator = TargetLocator.from_core(self.ard_dir)
        return self._locator

    def read(self, targetids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(found, flux, ivar, mask) for a batch; rows of unknown ids are zero and found False."""
        targetids = np.asarray(targetids, dtype=np.int64)
        with self._lock:
            loc = self.locator.locate(targetids)
            n = len(targetids)
            found = loc.file_code >= 0
            flux = np.zeros((n, grid.NPIX), dtype=np.float32)
            ivar = np.zeros((n, grid.NPIX), dtype=np.float32)
            mask = np.zeros((n, grid.NPIX), dtype=np.uint32)
            for code in np.unique(loc.file_code[found]):
                sel = np.flatnonzero(loc.file_code == code)
                rows, ok = self._reader.verified_rows(loc.files[code], targetids[sel], loc.row[sel])
                found[sel[~ok]] = False
                sel, rows = sel[ok], rows[ok]
                f, i, m = self._reader.read(loc.files[code], rows)
                flux[sel], ivar[sel], mask[sel] = f, i, m
            return found, flux, ivar, mask

    def close(self) -> None:
        """Close the spectra files this function keeps open."""
        self._reader.close()

    def __call__(self, targetid: pa.Array) -> pa.Array:
        ids = targetid.to_numpy(zero_copy_only=False) if targetid.null_count == 0 else (
            targetid.fill_null(-1).to_numpy(zero_copy_only=False)
        )
        ids = np.asarray(ids, dtype=np.int64)
        found, flux, ivar, mask = self.read(ids)
        if targetid.null_count:
            found &= targetid.is_valid().to_numpy(zero_copy_only=False)
        n = len(ids)
        children = [
            pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), grid.NPIX)
            for values in (np.tile(self._wave, n), flux, ivar, mask)
        ]
        return pa.StructArray.from_arrays(children, fields=list(_ARROW_TYPE), mask=pa.array(~found))


def register(con: duckdb.DuckDBPyConnection, ard: "ARD") -> None:
    """Register ``spectrum(BIGINT)`` for this ARD."""
    body = ard.cache.get("spectrum")
    if body is None:
        body = ard.cache["spectrum"] = SpectrumFunction(ard.path)
    # side_effects=True keeps DuckDB from constant-folding spectrum(<literal id>) at plan time:
    # folding turns the 31k-element result into a Value element by element, which made a
    # single-target query 3x slower (bench/bench_spectrum.py: p50 7.9 ms -> 2.7 ms).
    create_function(con, ard, "spectrum", body, ["BIGINT"], RETURN_TYPE, type="arrow", null_handling="special",
                    side_effects=True)
