"""The compacted Swiss Army table: every layer of a partition joined once, at build time.

A query on the ``ard`` view joins up to six staging tables on TargetID. At
10^7 rows those hash joins cost seconds, while the same filter on one wide
Parquet file per partition costs a tenth of that (bench/RESULTS.md, issue 10).
So after the layers, the build writes ``staging/wide/``: per partition, core
LEFT JOIN every layer's partition file (typed NULL columns for a layer that
has not written one), in the same HATS layout, with every column of the
contract. Column pruning still applies: a query that does not name the
embeddings does not read them.

The staging tables stay the source of truth; ``wide`` is derived. It is used
(by the ``ard`` view, ``db.query`` and the region macros) only while it is
complete: one wide file per core partition, none older than that partition's
layer files (:func:`is_current`). Whoever rewrites a layer partition outside
a build (the Bagpipes daemon) calls :func:`compact_partition` for it.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from ard_sql import contract, paths
from ard_sql.build import hats_writer

WIDE = contract.WIDE


def _literal(path: Path) -> str:
    return "'" + path.as_posix().replace("'", "''") + "'"


def partition_sql(ard_dir: Path | str, order: int, pixel: int) -> str:
    """SELECT that joins one partition's core file with each layer's file (NULLs for a missing one)."""
    from ard_sql import sql as packaged_sql
    from ard_sql.build.database import quote_ident

    selects, joins = [], []
    core = paths.partition_file(ard_dir, order, pixel)
    for layer, cols in contract.LAYER_COLUMNS.items():
        f = paths.partition_file(ard_dir, order, pixel, layer)
        names = [c for c in cols if c.name != "TargetID"] if layer != paths.CORE else cols
        if layer == paths.CORE or f.exists():
            selects += [f"{quote_ident(layer)}.{quote_ident(c.name)}" for c in names]
            if layer != paths.CORE:
                joins.append(f"LEFT JOIN read_parquet({_literal(f)}) AS {quote_ident(layer)} USING (TargetID)")
        else:
            selects += [f"CAST(NULL AS {_null_type(c.type)}) AS {quote_ident(c.name)}" for c in names]
    selects.append(f'{quote_ident(paths.CORE)}."_healpix_29"')
    return packaged_sql.text("templates/wide_partition.sql").format(
        columns=",\n       ".join(selects), core=_literal(core), joins="\n".join(joins))


def _null_type(duckdb_type: str) -> str:
    # WEB_CLASS is stored as its name (VARCHAR) in Parquet.
    return "VARCHAR" if duckdb_type == "WEB_CLASS" else duckdb_type


def compact_partition(ard_dir: Path | str, order: int, pixel: int) -> int:
    """(Re)write the wide file of one partition atomically; return its row count."""
    con = duckdb.connect()
    try:
        table = con.sql(partition_sql(ard_dir, order, pixel)).arrow().read_all()
    finally:
        con.close()
    write(ard_dir, order, pixel, table)
    return table.num_rows


def partition_is_current(ard_dir: Path | str, order: int, pixel: int) -> bool:
    """True when the partition's wide file exists and is at least as new as each of its layer files."""
    f = paths.partition_file(ard_dir, order, pixel, WIDE)
    if not f.exists():
        return False
    built = f.stat().st_mtime_ns
    for layer in contract.LAYER_COLUMNS:
        lf = paths.partition_file(ard_dir, order, pixel, layer)
        if lf.exists() and lf.stat().st_mtime_ns > built:
            return False
    return True


def assemble(tables: dict[str, pa.Table]) -> pa.Table:
    """The wide table of one partition from its layers' tables already in memory, row-aligned.

    For writers that hold every layer of a partition at once (``ard synth-catalog``):
    the tables must list the same TargetIDs in the same order (checked); a layer
    missing from ``tables`` gives NULL columns.
    """
    core = tables[paths.CORE]
    tid = core.column("TargetID")
    out = []
    for field in hats_writer.stored_schema(WIDE):
        owner = next((t for t in tables.values() if field.name in t.column_names), None)
        out.append(owner.column(field.name) if owner is not None else pa.nulls(core.num_rows, field.type))
    for layer, t in tables.items():
        if not t.column("TargetID").equals(tid):
            raise ValueError(f"compaction: layer {layer} rows are not aligned with core (TargetID order differs)")
    return pa.Table.from_arrays(out, schema=hats_writer.stored_schema(WIDE))


def write(ard_dir: Path | str, order: int, pixel: int, table: pa.Table) -> None:
    """Write one partition's wide file (and the table's schema file once)."""
    if not paths.schema_file(ard_dir, WIDE).exists():
        hats_writer.write_schema_file(ard_dir, WIDE)
    hats_writer.write_partition(ard_dir, WIDE, order, pixel, table.cast(hats_writer.stored_schema(WIDE)))


def is_current(ard_dir: Path | str) -> bool:
    """True when every core partition, and only those, has a current wide file."""
    core = {(o, p) for o, p, _ in hats_writer.partition_files(ard_dir, paths.CORE)}
    wide = {(o, p) for o, p, _ in hats_writer.partition_files(ard_dir, WIDE)}
    return bool(core) and wide == core and all(partition_is_current(ard_dir, o, p) for o, p in core)


__all__ = ["WIDE", "assemble", "compact_partition", "is_current", "partition_is_current", "partition_sql", "write"]
