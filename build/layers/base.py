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

from collections.abc import Callable
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


#: A checked option converter: returns the value converted, or raises ValueError saying what it must be.
Converter = Callable[[Any], Any]


def _is_number(value: Any) -> bool:
    """A real number given as a number (not a bool, not text)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def integer(minimum: int | None = None) -> Converter:
    """Converter to ``int``: an integer (``3``, ``3.0``, ``"3"``; never a bool or ``3.5``) of at least ``minimum``."""
    what = "an integer" + (f" >= {minimum}" if minimum is not None else "")

    def convert(value: Any) -> int:
        if isinstance(value, str):
            try:
                value = float(value.strip()) if value.strip() else None
            except ValueError:
                value = None
        if not _is_number(value) or not np.isfinite(value) or float(value) != int(value):
            raise ValueError(f"must be {what}")
        out = int(value)
        if minimum is not None and out < minimum:
            raise ValueError(f"must be {what}")
        return out

    convert.__doc__ = f"{what}."
    return convert


def number(minimum: float | None = None, maximum: float | None = None, above: float | None = None) -> Converter:
    """Converter to ``float``: a finite number (or its text) in ``[minimum, maximum]`` and ``> above``."""
    limits = []
    if above is not None:
        limits.append(f"> {above:g}")
    if minimum is not None and maximum is not None:
        limits.append(f"between {minimum:g} and {maximum:g}")
    elif minimum is not None:
        limits.append(f">= {minimum:g}")
    elif maximum is not None:
        limits.append(f"<= {maximum:g}")
    what = "a number" + (" " + " and ".join(limits) if limits else "")

    def convert(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be {what}") from None
        if not _is_number(value) or not np.isfinite(value):
            raise ValueError(f"must be {what}")
        out = float(value)
        if (minimum is not None and out < minimum) or (maximum is not None and out > maximum) \
                or (above is not None and out <= above):
            raise ValueError(f"must be {what}")
        return out

    convert.__doc__ = f"{what}."
    return convert


def text(value: Any) -> str:
    """Converter to ``str``: a string (a number given on the command line, e.g. a file named ``1``, is taken as text)."""
    if isinstance(value, str):
        return value
    if _is_number(value):
        return str(value)
    raise ValueError("must be a string")


#: Converters the plain types of a schema stand for (so ``{"n": int}`` refuses ``3.5`` and ``true``).
_STRICT: dict[Any, Converter] = {int: integer(), float: number(), str: text}
#: A fraction in [0, 1] (e.g. a bad-pixel fraction); a positive number; a positive integer; a count >= 0.
fraction = number(0.0, 1.0)
positive = number(above=0.0)
positive_integer = integer(1)
count = integer(0)


def parse_options(layer: str, given: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A layer's options converted by ``schema`` (name -> type or converter).

    An unknown name is an error naming the known ones; a value of the wrong
    type or out of range is a ValueError naming the layer, the option, the
    value and what it must be. ``int``, ``float`` and ``str`` in a schema are
    checked strictly (:func:`integer`, :func:`number`, :func:`text`).
    """
    unknown = set(given) - set(schema)
    if unknown:
        raise ValueError(f"{layer} layer: unknown option(s) {sorted(unknown)}; known: {sorted(schema)}")
    out = {}
    for key, value in given.items():
        convert = _STRICT.get(schema[key], schema[key])
        try:
            out[key] = convert(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{layer} layer: option {key}={value!r}: {exc}") from None
    return out


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
#     naming the bad one. The orchestrator calls it for every layer that was
#     given options (in ``--layers`` or not), before any work, so a typo fails
#     at once, not per partition after an hour of other layers. Global layers
#     have it too. Schemas use the checked converters above (``fraction``,
#     ``positive``, ``positive_integer``, ``count``, ...) for types and ranges.
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
