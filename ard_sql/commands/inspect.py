"""``ard info`` and ``ard sql``: look into an ARD without writing Python."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer
from rich.table import Table

from ard_sql.commands._common import fail, open_ard

FORMATS = ("table", "csv", "json")
#: A staging file named in a DuckDB error: ``.../staging/<table>/dataset/.../Npix=<p>.parquet``.
_STAGING_FILE = re.compile(r"(\S*staging/(?P<table>[A-Za-z0-9_]+)/\S*?\.parquet)")


def damaged_file_hint(message: str, ard_dir: Path) -> str:
    """What to do about a DuckDB read error: name the staging file it names and how to rebuild it.

    A truncated or damaged partition file makes every read of its table fail
    (DuckDB: "No magic bytes found at end of file ..."); the build skips a
    partition whose state says it is finished, so the file must be removed
    before ``ard build`` writes it again. Returns "" when the message names no
    staging file.
    """
    m = _STAGING_FILE.search(message)
    if not m:
        return ""
    path, table = m.group(1).strip("'\""), m.group("table")
    note = ""
    if table == "core":
        how, note = f"ard build SOURCE --out {ard_dir}", ", SOURCE being the DESI folder it was built from"
    elif table == "wide":
        how, note = f"ard build --out {ard_dir} --layers core", ": the compaction writes it again"
    else:
        how = f"ard build --out {ard_dir} --layers {table}"
    return f"the {table} partition file {path} is damaged or truncated; remove it and rebuild it with `{how}`{note}"


def info(ard_dir: Path = typer.Argument(..., help="ARD folder.")) -> None:
    """Show an ARD's tables, row counts per layer, provenance and last build report."""
    from rich.console import Console

    import duckdb

    db = open_ard(ard_dir)
    out = Console()
    with db:
        counts = Table("table", "rows", title=f"ARD {db.path}")
        for layer in ("core", "lick", "ppxf", "bagpipes", "embed", "topology"):
            try:
                counts.add_row(layer, str(db.sql(f"SELECT count(*) FROM {layer}").fetchall()[0][0]))
            except duckdb.Error as exc:
                hint = damaged_file_hint(str(exc), db.path)
                raise fail(f"cannot read the {layer} table of {db.path}: " + (hint or f"{exc}; rebuild it with "
                           f"`ard build --out {db.path} --layers {layer}` (--force to rewrite every file)")) from None
        out.print(counts)
        meta = Table("section", "name", "value", title="ard_meta (build and versions)")
        try:
            rows = db.sql("SELECT section, name, value FROM ard_meta WHERE section <> 'column' ORDER BY section, name").fetchall()
        except duckdb.Error as exc:
            raise fail(f"cannot read ard_meta of {db.path} ({exc}); rebuild the database with `ard build --out {db.path}`") from None
        for row in rows:
            meta.add_row(*[shorten(str(v), 400) for v in row])
        out.print(meta)
    report = db.path / "build-report.json"
    if report.exists():
        data = json.loads(report.read_text())
        out.print(f"last build: {data.get('finished')}, {data.get('n_errors')} errors, {data.get('n_warnings')} warnings")


def sql(
    ard_dir: Path = typer.Argument(..., help="ARD folder."),
    query: str = typer.Argument(..., help="SQL query, e.g. \"SELECT count(*) FROM ard WHERE Z < 0.2\"."),
    format: str = typer.Option("table", "--format", help="Output: table, csv or json (one object per row)."),
    limit: int = typer.Option(1000, "--max-rows", help="Largest number of rows printed as a table."),
) -> None:
    """Run one SQL query on an ARD (read-only, every SQL function registered) and print the result."""
    import duckdb

    if format not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    db = open_ard(ard_dir)
    with db:
        try:
            rel = db.sql(query)
            if rel is None:
                return
            table = rel.arrow().read_all()
        except duckdb.Error as exc:
            hint = damaged_file_hint(str(exc), db.path)
            raise fail(f"query failed: {exc}" + (f"\n{hint}" if hint else "")) from None
    if format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(csv_ready(table), sys.stdout.buffer)
    elif format == "json":
        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        print_table(table, limit)


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, with an ellipsis where it was cut."""
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def csv_ready(table: "pa.Table") -> "pa.Table":
    """``table`` with nested columns (embedding vectors, lists, structs) as JSON text: CSV has no nested type."""
    import pyarrow as pa

    for i, col in enumerate(table.columns):
        t = col.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
                or pa.types.is_struct(t) or pa.types.is_map(t):
            text = pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())
            table = table.set_column(i, table.field(i).name, text)
    return table


#: Narrowest useful column of the table output: with more columns than fit, rows are printed one field per line.
_MIN_COLUMN_WIDTH = 9


def print_table(table: "pa.Table", limit: int) -> None:
    """Print up to ``limit`` rows as a table; a result too wide for the terminal prints each row as name / value pairs."""
    from rich.console import Console

    console = Console()
    rows = table.slice(0, limit).to_pylist()
    if table.num_columns * _MIN_COLUMN_WIDTH <= console.width:
        out = Table(*table.column_names)
        for row in rows:
            out.add_row(*[shorten(str(v), 200) for v in row.values()])
        console.print(out)
    else:  # expanded display (psql's \x): one small table per row
        for n, row in enumerate(rows, 1):
            out = Table("column", "value", title=f"row {n}", title_justify="left")
            for name, v in row.items():
                out.add_row(name, shorten(str(v), max(20, console.width - 30)))
            console.print(out)
    if table.num_rows > limit:
        Console(stderr=True).print(f"({table.num_rows} rows, {limit} shown; --max-rows for more, --format csv for all)")


def register(app: typer.Typer) -> None:
    """Add ``ard info`` and ``ard sql`` to the app."""
    app.command("info", short_help="An ARD's tables, row counts, provenance, report.")(info)
    app.command("sql", short_help="Run one SQL query on an ARD and print the result.")(sql)
