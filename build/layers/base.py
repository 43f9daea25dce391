"""The contract between the orchestrator and a build layer.

A per-partition layer is a function of one partition: it receives the core
rows of that partition and (lazily) their spectra, and returns an Arrow table
with ``TargetID`` plus the layer's declared columns (``ard_sql.contract``),
one row per core row. It holds only its science: the orchestrator owns Dask,
retries, progress bars, fingerprints (skip finished partitions) and atomic
writes, and turns an exception into a report entry naming layer, pixel and
reason. A spectrum the layer cannot handle gets NULLs and a flag, never an
exception and never a made-up number.

A global layer (topology) needs every position at once; it implements
``run_global`` and returns one table per partition pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa


@dataclass
class SpectraBatch:
    """Spectra of one partition on the common brz grid (see ``ard_sql.grid``)."""

    targetid: np.ndarray
    """(n,) int64, same order as the partition's core rows."""
    wave: np.ndarray
    """(NPIX,) float64 vacuum Angstrom, observed frame."""
    flux: np.ndarray
    """(n, NPIX) float32 in 1e-17 erg/s/cm2/A."""
    ivar: np.ndarray
    """(n, NPIX) float32; 0 where a pixel is bad or masked."""
    mask: np.ndarray
    """(n, NPIX) uint32 DESI mask bits; 0 is good."""
    lsf_sigma: np.ndarray
    """(NPIX,) float32 instrumental Gaussian sigma in Angstrom, mean over the partition (from RESOLUTION)."""


@dataclass
class Partition:
    """One HEALPix partition handed to a layer."""

    ard_dir: Path
    order: int
    pixel: int
    core: pa.Table
    """Rows of ``staging/core`` for this partition (every core column)."""
    options: dict[str, Any] = field(default_factory=dict)
    """This layer's options (``BuildOptions.layer_options[layer]``)."""
    _spectra: SpectraBatch | None = None

    def spectra(self) -> SpectraBatch:
        """Load (once) the partition's spectra, in core-row order."""
        if self._spectra is None:
            from ard_sql.spectra_store import read_partition

            self._spectra = read_partition(self.ard_dir, self.order, self.pixel, self.core.column("TargetID").to_numpy())
        return self._spectra


def parse_options(layer: str, given: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A layer's options converted by ``schema`` (name -> type); an unknown name is an error naming the known ones."""
    unknown = set(given) - set(schema)
    if unknown:
        raise ValueError(f"{layer} layer: unknown option(s) {sorted(unknown)}; known: {sorted(schema)}")
    return {k: schema[k](v) for k, v in given.items()}


@runtime_checkable
class Layer(Protocol):
    """A per-partition build layer."""

    name: str
    """Staging table name; a key of ``ard_sql.contract.LAYER_COLUMNS``."""
    version: str
    """Bump to invalidate finished partitions when the science changes."""

    def run(self, part: Partition) -> pa.Table:
        """Return TargetID + this layer's columns for every core row of ``part``."""
        ...


# Optional hooks of a per-partition layer class (the orchestrator looks for them):
#
# ``prepare(self, ard_dir: Path, options: dict, force: bool) -> str``
#     survey-wide work before the partitions (e.g. training an encoder on a
#     sample of every partition's spectra), in the main process. Returns a
#     token (a hash of what it made) that joins every partition's fingerprint,
#     so new weights re-run every partition.
# ``check_options(options: dict)`` (a staticmethod; what it returns is not used)
#     the layer's options parsed as its run parses them, plus what only the
#     build's own machine can check (a file, a device); raises ValueError
#     naming the bad one. The orchestrator calls it for every layer of the
#     build that was given options, before any work, so a typo fails at once,
#     not per partition after an hour of other layers. Global layers have it too.
# ``finalize(ard_dir: Path, options: dict) -> dict[str, str]`` (a staticmethod)
#     survey-wide work after the partitions (e.g. the HNSW indexes, agreement
#     figures); the returned pairs go into ``ard_meta`` (section 'build').


@runtime_checkable
class GlobalLayer(Protocol):
    """A layer that needs the whole survey at once (e.g. topology)."""

    name: str
    version: str

    def run_global(self, ard_dir: Path, core: pa.Table, options: dict[str, Any]) -> dict[int, pa.Table]:
        """Return, per partition pixel, TargetID + this layer's columns.

        ``core`` holds TargetID, RA, DEC, Z, Npix (the partition pixel) and the
        columns the layer asks for, for the whole survey.
        """
        ...
