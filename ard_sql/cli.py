"""The ``ard`` command line: build, inspect and query an Analysis Ready Dataset.

Each command lives in its own module under ``ard_sql/commands/`` and adds
itself to the app with ``register(app)``.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="ard",
    help=(
        "ard_sql: the DESI galaxy-spectra archive as an Analysis Ready Dataset.\n\n"
        "Start with `ard demo` (mock survey, every layer, the example workflow), or\n"
        "`ard mock --out survey --n 2000` then `ard build survey --out my_ard` and\n"
        "`ard sql my_ard \"SELECT count(*) FROM ard\"`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: rich's option table cut long option names and words at 80 columns
    rich_markup_mode=None,
)

#: Command modules, in the order `ard --help` lists them.
COMMAND_MODULES: list[str] = ["demo", "mock", "build", "inspect", "plot", "synth", "release", "daemon"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"ard_sql.commands.{_name}").register(app)


def main() -> None:
    """Entry point for ``python -m ard_sql``."""
    app()
