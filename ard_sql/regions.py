"""Sky regions that read only the HATS partitions they overlap.

A region has two faces:

- ``partition_pixels(orders)``: the HEALPix NESTED pixels, at every partition
  order of the catalog, that may overlap it (a superset: healpy's
  ``inclusive=True`` queries, MOC ranges). As a constant list in
  ``list_contains([...], Npix)`` DuckDB turns it into a *file filter* on the
  ``Npix`` number parsed from the file name, so no other partition is opened
  (verified with EXPLAIN ANALYZE: "Scanning Files: k/N").
- ``sql_exact()``: an SQL test on ``RA``/``DEC`` (the ``cone`` macro of
  ``sql/macros/cone.sql`` for a cone; ``_healpix_29`` for a MOC) that decides
  membership exactly, so the answer never depends on the pruning. A pixel
  number shared by two orders only costs an extra file read.

A point's order-29 pixel is :func:`ard_sql.build.hats_writer.healpix29`, the
function that writes the stored ``_healpix_29`` column, so ``Moc.contains``
(``in_region``) and ``Moc.sql_exact`` (``db.query``) agree on pixel boundaries.

Regions are written as strings so they travel through SQL and the command
line: ``'CIRCLE ra dec radius'``, ``'POLYGON ra1 dec1 ra2 dec2 ra3 dec3 ...'``
(convex, great-circle edges, degrees) and ``'MOC 5/12-15 6/100'`` (the IVOA
MOC ASCII serialisation, read with mocpy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import healpy as hp
import numpy as np

from ard_sql import paths
from ard_sql.build.hats_writer import healpix29

HEALPIX_ORDER_MAX = 29


def catalog_orders(ard_dir: Path | str, layer: str = paths.CORE) -> list[int]:
    """Partition orders present in a staging catalog (from its ``Norder=K`` folders)."""
    root = paths.staging_dir(ard_dir, layer) / "dataset"
    orders = []
    for d in root.glob("Norder=*"):
        m = re.fullmatch(r"Norder=(\d+)", d.name)
        if m and d.is_dir():
            orders.append(int(m.group(1)))
    return sorted(orders)


def partition_files(ard_dir: Path | str, layer: str, region: "Region | None") -> list[Path]:
    """Partition files of a staging table that may overlap ``region`` (all files when None).

    A table with no file in the region gives its zero-row ``_schema.parquet``,
    so a query over it stays typed and returns no row.
    """
    root = paths.staging_dir(ard_dir, layer) / "dataset"
    found: dict[tuple[int, int], Path] = {}
    for f in root.glob("Norder=*/Dir=*/Npix=*.parquet"):
        m = re.fullmatch(r"Npix=(\d+)\.parquet", f.name)
        n = re.fullmatch(r"Norder=(\d+)", f.parent.parent.name)
        if m and n:
            found[(int(n.group(1)), int(m.group(1)))] = f
    if region is None:
        keep = sorted(found)
    else:
        keep = []
        for order in sorted({o for o, _ in found}):
            pix = set(int(p) for p in region.pixels_at(order))
            keep += [(o, p) for (o, p) in sorted(found) if o == order and p in pix]
    files = [found[k] for k in keep]
    return files or [paths.schema_file(ard_dir, layer)]


# Unit vectors come from ard_sql.science.positions.unit_vectors, imported where used: that
# module loads astropy.cosmology (~0.5 s), which opening an ARD does not otherwise need.


def _sql_unit_vector() -> tuple[str, str, str]:
    return ("(cos(radians(DEC)) * cos(radians(RA)))", "(cos(radians(DEC)) * sin(radians(RA)))", "sin(radians(DEC))")


def _g(x: float) -> str:
    return repr(float(x))


class Region:
    """A sky region: partition pixels that may overlap it and an exact SQL test."""

    def pixels_at(self, order: int) -> np.ndarray:
        """Pixels (NESTED) at ``order`` that may overlap the region (a superset)."""
        raise NotImplementedError

    def sql_exact(self) -> str:
        """SQL expression over the ``ard`` columns that is true exactly inside the region."""
        raise NotImplementedError

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Exact membership of points (degrees), vectorised."""
        raise NotImplementedError

    def partition_pixels(self, orders: Iterable[int]) -> list[int]:
        """Union of :meth:`pixels_at` over the catalog's partition orders, sorted."""
        out: set[int] = set()
        for order in orders:
            out.update(int(p) for p in self.pixels_at(int(order)))
        return sorted(out)


@dataclass(frozen=True)
class Cone(Region):
    """Every point within ``radius`` degrees (great-circle) of (``ra``, ``dec``)."""

    ra: float
    dec: float
    radius: float

    def __post_init__(self) -> None:
        if not (-90.0 <= self.dec <= 90.0):
            raise ValueError(f"cone: dec0={self.dec} is outside [-90, 90] degrees")
        if not (0.0 < self.radius <= 180.0):
            raise ValueError(f"cone: radius={self.radius} must be in (0, 180] degrees")

    def pixels_at(self, order: int) -> np.ndarray:
        from ard_sql.science.positions import unit_vectors

        return hp.query_disc(2**order, unit_vectors(self.ra, self.dec), np.radians(self.radius), inclusive=True, nest=True)

    def sql_exact(self) -> str:
        """A call of the ``cone`` macro (``sql/macros/cone.sql``, the one SQL haversine).

        The macro is persistent in ``ard.duckdb`` and created as a TEMP macro
        by ``ard_sql.open()`` on an ARD built before it existed.
        """
        return f"cone(RA, DEC, {_g(self.ra)}, {_g(self.dec)}, {_g(self.radius)})"

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        return angular_separation_deg(ra, dec, self.ra, self.dec) <= self.radius


@dataclass(frozen=True)
class Polygon(Region):
    """A convex spherical polygon with great-circle edges (vertices in degrees, any winding)."""

    vertices: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if len(self.vertices) < 3:
            raise ValueError(f"polygon: needs at least 3 vertices, got {len(self.vertices)}")
        from ard_sql.science.positions import unit_vectors

        normals = self.edge_normals()
        v = unit_vectors(*np.array(self.vertices, dtype=float).T)
        side = v @ normals.T  # (n_vertices, n_edges): >= 0 on the inner side
        if np.any(side < -1e-12):
            raise ValueError("polygon: vertices must describe a convex polygon (smaller than a hemisphere); split a concave one")

    def edge_normals(self) -> np.ndarray:
        """Inward normals of the edges' great circles."""
        from ard_sql.science.positions import unit_vectors

        v = unit_vectors(*np.array(self.vertices, dtype=float).T)
        n = np.cross(v, np.roll(v, -1, axis=0))
        centre = v.sum(axis=0)
        if np.linalg.norm(centre) == 0 or np.any(np.linalg.norm(n, axis=1) == 0):
            raise ValueError("polygon: degenerate vertices (repeated or antipodal)")
        if (n @ centre).sum() < 0:  # clockwise input: flip so normals point inward
            n = -n
        return n

    def pixels_at(self, order: int) -> np.ndarray:
        from ard_sql.science.positions import unit_vectors

        v = unit_vectors(*np.array(self.vertices, dtype=float).T)
        if (np.cross(v, np.roll(v, -1, axis=0)) @ v.sum(axis=0)).sum() < 0:
            v = v[::-1]
        return hp.query_polygon(2**order, v, inclusive=True, nest=True)

    def sql_exact(self) -> str:
        x, y, z = _sql_unit_vector()
        terms = [f"({_g(a)} * {x} + {_g(b)} * {y} + {_g(c)} * {z} >= 0)" for a, b, c in self.edge_normals()]
        return "(" + " AND ".join(terms) + ")"

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        from ard_sql.science.positions import unit_vectors

        p = unit_vectors(ra, dec)
        return np.all(p @ self.edge_normals().T >= 0, axis=-1)


@dataclass(frozen=True)
class Moc(Region):
    """A HEALPix multi-order coverage map; membership by each row's ``_healpix_29``."""

    text: str

    def _moc(self):  # noqa: ANN202 (mocpy type)
        from mocpy import MOC

        try:
            return MOC.from_str(self.text)
        except Exception as err:  # mocpy raises bare exceptions on bad text
            raise ValueError(f"MOC {self.text!r} is not valid MOC ASCII (e.g. '5/12-15 6/100'): {err}") from None

    def ranges29(self) -> np.ndarray:
        """Half-open ``_healpix_29`` ranges, shape (n, 2)."""
        return np.asarray(self._moc().to_depth29_ranges, dtype=np.int64).reshape(-1, 2)

    def pixels_at(self, order: int) -> np.ndarray:
        shift = 2 * (HEALPIX_ORDER_MAX - order)
        out = [np.arange(lo >> shift, ((hi - 1) >> shift) + 1) for lo, hi in self.ranges29()]
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def sql_exact(self) -> str:
        terms = [f"(_healpix_29 >= {lo} AND _healpix_29 < {hi})" for lo, hi in self.ranges29()]
        return "(" + (" OR ".join(terms) or "FALSE") + ")"

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        ipix = healpix29(ra, dec)
        r = self.ranges29()
        i = np.searchsorted(r[:, 0], ipix, side="right") - 1
        return (i >= 0) & (ipix < r[np.clip(i, 0, None), 1])


def angular_separation_deg(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    """Great-circle distance in degrees (haversine, the same formula as the ``cone`` macro)."""
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    ra0, dec0 = np.radians(ra0), np.radians(dec0)
    h = np.sin((dec - dec0) / 2) ** 2 + np.cos(dec) * np.cos(dec0) * np.sin((ra - ra0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def parse_region(text: str) -> Region:
    """Read ``'CIRCLE ra dec r'``, ``'POLYGON ra1 dec1 ...'`` or ``'MOC 5/12-15 ...'``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("region: empty; use 'CIRCLE ra dec r', 'POLYGON ra1 dec1 ra2 dec2 ra3 dec3' or 'MOC 5/12-15'")
    kind, _, rest = text.strip().partition(" ")
    kind = kind.upper()
    if kind == "MOC":
        return Moc(rest.strip())
    try:
        nums = [float(x) for x in rest.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"region {text!r}: coordinates must be numbers (degrees)") from None
    if kind == "CIRCLE":
        if len(nums) != 3:
            raise ValueError(f"region {text!r}: CIRCLE takes ra dec radius (3 numbers), got {len(nums)}")
        return Cone(*nums)
    if kind == "POLYGON":
        if len(nums) < 6 or len(nums) % 2:
            raise ValueError(f"region {text!r}: POLYGON takes ra dec pairs (at least 3), got {len(nums)} numbers")
        return Polygon(tuple(zip(nums[::2], nums[1::2])))
    raise ValueError(f"region {text!r}: unknown kind {kind!r}; use CIRCLE, POLYGON or MOC")
