"""Create ``ard.duckdb``: types, views, macros and the ``ard_meta`` and ``ard_functions`` tables.

The database file holds no data, only objects over the staging Parquet files,
created in this order from the ``.sql`` files of ``ard_sql.sql``:

1. ``types.sql`` (the ``WEB_CLASS`` ENUM);
2. one staging view per table of the column contract (``templates/staging_view.sql``),
   named after the table: ``core``, ``lick``, ``ppxf``, ``bagpipes``, ``embed``, ``topology``;
3. the ``ard`` view (``templates/ard_view.sql``): core LEFT JOIN each layer;
4. every other top-level ``*.sql``, then ``macros/*.sql``, then ``views/*.sql``,
   each group in file-name order (macros and case-study views; one object
   per file, named after it);
5. ``tables/ard_meta.sql`` filled with provenance and the unit and
   description of every column (also set as column comments of ``ard``);
6. ``tables/ard_functions.sql`` filled with every SQL function and macro and
   where it works (``ard_sql.udfs.function_catalog``), so that a plain DuckDB
   client that reports ``spectrum`` missing can find out why.

The file is written under a temporary name and renamed into place, so a
reader never opens a half-made database.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import duckdb

from ard_sql import contract, paths
from ard_sql import sql as packaged_sql
from ard_sql.build import hats_writer

#: Extra SQL folders executed after the core views, in this order ("" = top level).
EXTRA_SQL_FOLDERS = ("", "macros", "views")
#: Top-level files run by this module itself (not as "extra" SQL).
_OWN_SQL = {"types.sql"}


#: Partition columns of the core view (and of ``ard``), beyond the contract:
#: the HATS spatial index and the partition read from each file name. TRY_CAST
#: (the zero-row ``_schema.parquet`` has no Npix in its name) keeps the
#: ``list_contains([...], Npix)`` file filter working: DuckDB then opens only
#: the matching partition files.
PARTITION_COLUMN_NAMES = ("_healpix_29", "Norder", "Npix")
PARTITION_COLUMNS = [
    '"_healpix_29"',
    "TRY_CAST(regexp_extract(filename, 'Norder=(\\d+)', 1) AS TINYINT) AS \"Norder\"",
    "TRY_CAST(regexp_extract(filename, 'Npix=(\\d+)', 1) AS INTEGER) AS \"Npix\"",
]


def quote_ident(name: str) -> str:
    """Quote a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """Quote a DuckDB string literal."""
    return "'" + text.replace("'", "''") + "'"


def staging_view_sql(layer: str, ard_dir: Path | str) -> str:
    """``CREATE OR REPLACE VIEW <layer>`` over the layer's Parquet files (typed by the contract)."""
    exprs = [f"CAST({quote_ident(c.name)} AS {c.type}) AS {quote_ident(c.name)}" for c in contract.columns(layer)]
    if layer in (paths.CORE, contract.WIDE):
        exprs += PARTITION_COLUMNS
    return packaged_sql.text("templates/staging_view.sql").format(
        view=quote_ident(layer),
        columns=",\n       ".join(exprs),
        layer=layer,
        ard_dir=quote_literal(Path(ard_dir).resolve().as_posix()),
        filename="true" if layer in (paths.CORE, contract.WIDE) else "false",
    )


def ard_view_sql(compacted: bool = False) -> str:
    """``CREATE OR REPLACE VIEW ard``: every contract column, layers joined on TargetID.

    With ``compacted`` (the build's ``wide`` table is current, ``build/compaction.py``)
    the view reads that one table instead of joining the layers: the same rows and
    columns, without the joins.
    """
    layers = [name for name in contract.LAYER_COLUMNS if name != paths.CORE]
    cols = [quote_ident(c.name) for c in contract.all_columns()] + [quote_ident(c) for c in PARTITION_COLUMN_NAMES]
    joins = "\n".join(f"LEFT JOIN {quote_ident(layer)} USING (TargetID)" for layer in layers)
    return packaged_sql.text("templates/ard_view.sql").format(
        columns=",\n       ".join(cols), source=quote_ident(contract.WIDE) if compacted else quote_ident(paths.CORE),
        joins="" if compacted else joins)


def extra_sql_files() -> list[str]:
    """Relative names of the packaged macro and view files, in execution order."""
    return [rel for folder in EXTRA_SQL_FOLDERS for rel in packaged_sql.files(folder) if rel not in _OWN_SQL]


def create_views(con: duckdb.DuckDBPyConnection, ard_dir: Path | str) -> list[str]:
    """Execute types, staging views, the ``ard`` view, macros and extra views on ``con``.

    The core objects must succeed (an exception otherwise). A macro or extra
    view file that fails is skipped and its error returned ("sql/<file>: reason"),
    so one broken case-study file does not cost the whole database.
    """
    from ard_sql.build import compaction

    con.execute(packaged_sql.text("types.sql"))
    for layer in contract.LAYER_COLUMNS:
        con.execute(staging_view_sql(layer, ard_dir))
    compacted = compaction.is_current(ard_dir)
    if compacted:
        con.execute(staging_view_sql(contract.WIDE, ard_dir))
    con.execute(ard_view_sql(compacted))
    if (Path(ard_dir) / "artifacts" / "topology" / "filaments.parquet").exists():
        con.execute(packaged_sql.text("templates/filaments_view.sql").format(ard_dir=quote_literal(Path(ard_dir).resolve().as_posix())))
    problems = []
    for rel in extra_sql_files():
        try:
            con.execute(packaged_sql.text(rel))
        except duckdb.Error as exc:
            problems.append(f"sql/{rel}: {str(exc).splitlines()[0]}")
    return problems


@dataclass
class Provenance:
    """What ``ard_meta`` records about one build."""

    source: str = ""
    build_date: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    layer_versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("ard_sql", "duckdb", "numpy", "pyarrow", "astropy", "h5py", "hats", "healpy", "dask"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def meta_rows(prov: Provenance) -> list[tuple[str, str, str | None, str | None, str | None, str | None]]:
    """Rows (section, name, value, unit, description, layer) of ``ard_meta``."""
    rows: list[tuple[str, str, str | None, str | None, str | None, str | None]] = [
        ("build", "source", prov.source, None, "Folder of DESI files the core was ingested from", None),
        ("build", "date", prov.build_date, None, "UTC time the database was last written", None),
        ("build", "options", json.dumps(prov.options, sort_keys=True, default=str), None, "BuildOptions as JSON", None),
    ]
    rows += [("build", k, v, None, None, None) for k, v in sorted(prov.extra.items())]
    rows += [("version", k, v, None, None, None) for k, v in _versions().items()]
    rows += [("layer", k, v, None, "layer version of the finished partitions", k) for k, v in sorted(prov.layer_versions.items())]
    seen: set[str] = set()
    for layer, cols in contract.LAYER_COLUMNS.items():
        for c in cols:
            if c.name.lower() in seen:
                continue
            seen.add(c.name.lower())
            rows.append(("column", c.name, c.type, c.unit or None, c.description or None, layer))
    return rows


def read_provenance(ard_dir: Path | str) -> Provenance | None:
    """The provenance stored in an existing ``ard.duckdb``; None only when there is no ``ard.duckdb``.

    Raises ``BuildFailed`` (naming the file and the reason) when the file
    exists but cannot be read (locked by another process, another DuckDB
    storage version, no ``ard_meta``): rewriting it then would drop the
    versions and extras of the layers this build does not re-run.
    """
    from ard_sql.build.orchestrator import BuildFailed  # deferred: the orchestrator imports this module

    db = paths.db_path(ard_dir)
    if not db.exists():
        return None
    # write_database renames the file into place only after ard_meta is filled, so an
    # existing file without it was not made by a finished build: never taken as "no provenance".
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as exc:
        raise BuildFailed(f"cannot read the provenance in {db} ({type(exc).__name__}: {exc}); "
                          "close the process that holds it, or move the file away to rebuild without it") from exc
    try:
        rows = con.execute("SELECT section, name, value FROM ard_meta WHERE section IN ('build', 'layer')").fetchall()
    except duckdb.Error as exc:
        raise BuildFailed(f"cannot read the provenance table ard_meta in {db} ({type(exc).__name__}: {exc}); "
                          "move the file away to rebuild without it") from exc
    finally:
        con.close()
    prov = Provenance()
    for section, name, value in rows:
        if section == "layer":
            prov.layer_versions[name] = value
        elif name == "source":
            prov.source = value
        elif name == "date":
            prov.build_date = value
        elif name == "options":
            prov.options = json.loads(value or "{}")
        else:
            prov.extra[name] = value
    return prov


def _comment_columns(con: duckdb.DuckDBPyConnection) -> None:
    for c in contract.all_columns():
        text = c.description + (f" [{c.unit}]" if c.unit else "")
        if text:
            con.execute(f"COMMENT ON COLUMN ard.{quote_ident(c.name)} IS {quote_literal(text)}")


def ensure_schema_files(ard_dir: Path | str, layers: Iterable[str] | None = None) -> None:
    """Write the zero-row ``_schema.parquet`` of every staging table (so every view opens)."""
    for layer in layers or contract.LAYER_COLUMNS:
        hats_writer.write_schema_file(ard_dir, layer)


def write_database(ard_dir: Path | str, prov: Provenance) -> list[str]:
    """(Re)create ``ard.duckdb`` atomically, with absolute paths to this ARD folder.

    Returns the problems of macro/view files that could not be created (see
    :func:`create_views`); they are also recorded in ``ard_meta`` (section 'problem').
    """
    ard_dir = Path(ard_dir).resolve()
    ensure_schema_files(ard_dir)
    db = paths.db_path(ard_dir)
    tmp = paths.temporary_sibling(db)
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            from ard_sql.connection import ARD
            from ard_sql.udfs import function_catalog

            # Types, then UDFs: persistent macros may call UDFs (they bind at creation),
            # and the UDF modules' TEMP macros cast to the types.
            con.execute(packaged_sql.text("types.sql"))
            ard = ARD.attach(con, ard_dir)
            problems = create_views(con, ard_dir)
            con.execute(packaged_sql.text("tables/ard_meta.sql"))
            con.execute(packaged_sql.text("tables/ard_functions.sql"))
            con.executemany("INSERT INTO ard_functions VALUES (?, ?, ?, ?)", function_catalog())
            rows = meta_rows(prov) + [("problem", f"sql_{i}", p, None, "SQL file not created", None) for i, p in enumerate(problems)]
            con.executemany("INSERT INTO ard_meta VALUES (?, ?, ?, ?, ?, ?)", rows)
            _comment_columns(con)
            con.execute("CHECKPOINT")
        finally:
            ard.close() if "ard" in locals() else con.close()
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return problems


def relocate(ard_dir: Path | str) -> list[str]:
    """Rewrite ``ard.duckdb`` so its views point at this folder's current location."""
    ard_dir = Path(ard_dir).resolve()
    prov = read_provenance(ard_dir) or Provenance()
    prov.extra["relocated_to"] = ard_dir.as_posix()
    return write_database(ard_dir, prov)
