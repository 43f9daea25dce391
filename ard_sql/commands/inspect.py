"""``ard info`` and ``ard sql``: look into an ARD without writing Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from ard_sql.commands._common import fail, open_ard

FORMATS = ("table", "csv", "json")


def info(ard_dir: Path = typer.Argument(..., help="ARD folder.")) -> None:
    """Show an ARD's tables, row counts per layer, provenance and last build report."""
    from rich.console import Console

    db = open_ard(ard_dir)
    out = Console()
    with db:
        counts = Table("table", "rows", title=f"ARD {db.path}")
        for layer in ("core", "lick", "ppxf", "bagpipes", "embed", "topology"):
            counts.add_row(layer, str(db.sql(f"SELECT count(*) FROM {layer}").fetchall()[0][0]))
        out.print(counts)
        meta = Table("section", "name", "value", title="ard_meta (build and versions)")
        for row in db.sql("SELECT section, name, value FROM ard_meta WHERE section <> 'column' ORDER BY section, name").fetchall():
            meta.add_row(*[str(v)[:100] for v in row])
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
            raise fail(f"query failed: {exc}") from None
    if format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    elif format == "json":
        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        from rich.console import Console

        out = Table(*table.column_names)
        for row in table.slice(0, limit).to_pylist():
            out.add_row(*[str(v) for v in row.values()])
        Console().print(out)
        if table.num_rows > limit:
            Console(stderr=True).print(f"({table.num_rows} rows, {limit} shown; use --format csv for all)")


def register(app: typer.Typer) -> None:
    """Add ``ard info`` and ``ard sql`` to the app."""
    app.command("info")(info)
    app.command("sql")(sql)
