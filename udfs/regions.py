"""Sky-region SQL functions and the table macros ``cone_search`` / ``region_search``.

- ``region_files(layer, region) -> VARCHAR[]``: the partition files of one
  staging table that may overlap ``region`` (see :mod:`ard_sql.regions` for the
  region strings). With constant arguments DuckDB evaluates it once, while
  binding ``read_parquet(region_files(...))``, so the other partitions are
  never opened: this is how ``cone_search`` and ``region_search`` prune.
- ``in_region(ra, dec, region) -> BOOLEAN``: exact membership, vectorised.
- TEMP table macros ``cone_search(ra0, dec0, radius_deg)`` and
  ``region_search(region)`` from ``sql/region_macros/cone_search.sql`` and
  ``sql/region_macros/region_search.sql`` (templates: the joined, typed, pruned scans are
  generated from the column contract).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ard_sql import contract, paths, regions
from ard_sql import sql as packaged_sql
from ard_sql.udfs import create_function

if TYPE_CHECKING:  # pragma: no cover
    from ard_sql.connection import ARD

#: SQL functions this module registers: name -> (signature, one line for ``ard_functions``);
#: the TEMP macros of ``MACRO_FILES`` are described by their files' first comment lines.
SQL_FUNCTIONS: dict[str, tuple[str, str]] = {
    "in_region": ("in_region(ra DOUBLE, dec DOUBLE, region VARCHAR)",
                  "exact membership in 'CIRCLE ra dec r', 'POLYGON ra1 dec1 ...' or 'MOC ...'"),
    "region_files": ("region_files(layer VARCHAR, region VARCHAR)",
                     "the partition files of a staging table that overlap a region (used by cone_search, region_search)"),
}

MACRO_FILES = ("region_macros/cone_search.sql", "region_macros/region_search.sql")
#: DuckDB 2.0 binds a table macro once when it is created, with each parameter
#: standing in as its own name (a string constant): these are the texts that
#: region_files then receives from cone_search and region_search.
_CREATION_PLACEHOLDERS = frozenset({"region", "CIRCLE ra0 dec0 radius_deg"})


@lru_cache(maxsize=256)
def _region(text: str) -> regions.Region:
    return regions.parse_region(text)


def macro_sql(filename: str, compacted: bool = False) -> str:
    """The TEMP table macro of ``sql/<filename>`` with its scans filled in.

    ``compacted``: scan the wide table, as the ``ard`` view does when
    :func:`ard_sql.query.reads_wide` says so.
    """
    from ard_sql.build.database import quote_ident
    from ard_sql.query import join_sql, typed_scan

    region_arg = "'CIRCLE ' || ra0 || ' ' || dec0 || ' ' || radius_deg" if Path(filename).name.startswith("cone") else "region"
    if compacted:
        source = typed_scan(contract.WIDE, f"region_files('{contract.WIDE}', {region_arg})")
    else:
        source = join_sql({name: typed_scan(name, f"region_files('{name}', {region_arg})") for name in contract.LAYER_COLUMNS})
    columns = ", ".join(quote_ident(c.name) for c in contract.all_columns())
    text = packaged_sql.text(filename)
    return text.replace("{columns}", columns).replace("{scans}", source)


def register(con: duckdb.DuckDBPyConnection, ard: "ARD") -> None:
    """Register ``region_files`` and ``in_region``; create the TEMP macros on ``con``."""
    root = ard.path

    def region_files(layer: str, region: str) -> list[str]:
        if layer not in contract.LAYER_COLUMNS and layer != contract.WIDE:
            raise ValueError(f"region_files: unknown table {layer!r}; known: {', '.join(contract.LAYER_COLUMNS)}")
        if region in _CREATION_PLACEHOLDERS:  # macro creation, not a query: the typed empty table
            return [paths.schema_file(root, layer).as_posix()]
        return [f.as_posix() for f in regions.partition_files(root, layer, _region(region))]

    def in_region(ra: pa.Array, dec: pa.Array, region: pa.Array) -> pa.Array:
        ra_np = pc.fill_null(ra, np.nan).to_numpy(zero_copy_only=False)
        dec_np = pc.fill_null(dec, np.nan).to_numpy(zero_copy_only=False)
        texts = np.asarray(region.to_pylist(), dtype=object)
        out = np.zeros(len(ra_np), dtype=bool)
        ok = np.isfinite(ra_np) & np.isfinite(dec_np)
        for text in set(t for t in texts if t is not None):
            sel = ok & (texts == text)
            out[sel] = _region(text).contains(ra_np[sel], dec_np[sel])
        nulls = pc.or_(pc.or_(pc.is_null(ra), pc.is_null(dec)), pc.is_null(region)).to_numpy(zero_copy_only=False)
        return pa.array(out, mask=nulls)

    create_function(con, ard, "region_files", region_files, ["VARCHAR", "VARCHAR"], "VARCHAR[]")
    create_function(con, ard, "in_region", in_region, ["DOUBLE", "DOUBLE", "VARCHAR"], "BOOLEAN", type="arrow", null_handling="special")
    has_cone = con.execute(
        "SELECT count(*) FROM duckdb_functions() WHERE function_name = 'cone' AND function_type = 'macro'"
    ).fetchall()[0][0]
    if not has_cone:  # an ARD built before sql/macros/cone.sql existed: same macro, per connection
        text = packaged_sql.text("macros/cone.sql")
        con.execute(text.replace("CREATE OR REPLACE MACRO", "CREATE OR REPLACE TEMP MACRO"))
    from ard_sql.query import reads_wide

    compacted = reads_wide(con)  # the ``ard`` view's build-time choice, not a stat of every file
    for filename in MACRO_FILES:
        con.execute(macro_sql(filename, compacted))
