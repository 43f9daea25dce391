"""Python SQL functions registered by ``ard_sql.open()`` on every connection.

Each module listed in ``UDF_MODULES`` (``ard_sql.udfs.<name>``) has
``register(con, ard) -> None``, called once per connection and per cursor by
the prepare step of ``ard_sql.connection``. A UDF engineer adds ONE line here.

Inside ``register`` define scalar functions with :func:`create_function`
(not ``con.create_function`` directly): DuckDB keeps Python functions per
database instance, shared by every cursor, so the helper creates each one
once and makes a name that two modules both claim an error naming it.
Connection-local objects (TEMP macros over a UDF) are created with plain
``con.execute`` in ``register``; they are per connection, so they are made
again for each cursor.

Each module also lists what it registers, for the ``ard_functions`` table of
``ard.duckdb`` (:func:`function_catalog`): ``SQL_FUNCTIONS`` (name ->
(signature, one line)) and, for its TEMP macros, ``MACRO_FILES`` (``sql/`` files
whose first comment line reads ``name(args): what it does``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

import duckdb

if TYPE_CHECKING:  # pragma: no cover
    from ard_sql.connection import ARD

#: UDF modules under ``ard_sql.udfs``, registered in this order.
UDF_MODULES: list[str] = [
    "spectrum",
    "lick",
    "regions",
    "similar",
]


class FunctionAlreadyRegistered(RuntimeError):
    """Two UDF modules (or one module twice) registered the same SQL function name."""


def create_function(
    con: duckdb.DuckDBPyConnection,
    ard: "ARD",
    name: str,
    function: Callable[..., Any],
    parameters: list[Any] | None,
    return_type: Any,
    **kwargs: Any,
) -> None:
    """Create the SQL function ``name`` for this ARD's database, once.

    Raises :class:`FunctionAlreadyRegistered` when ``name`` was already
    registered during the current prepare pass (a name clash between UDF
    modules). Creating it again for another cursor of the same database is a
    no-op, since DuckDB shares Python functions between cursors.
    """
    owner = ard._registering_module
    key = name.lower()
    claimed = ard._pass_functions.get(key)
    if claimed is not None:
        raise FunctionAlreadyRegistered(
            f"SQL function {name!r} is registered twice (by ard_sql.udfs.{claimed} and ard_sql.udfs.{owner})"
        )
    ard._pass_functions[key] = owner
    if key in ard._instance_functions:
        return
    try:
        # on the root connection, which outlives every ARD open on the file (see ard_sql.connection)
        ard.function_owner.create_function(name, function, parameters, return_type, **kwargs)
    except (duckdb.NotImplementedException, duckdb.CatalogException) as exc:
        # Another open() of the same file in this process already created it
        # (same DuckDB instance): the function is there, which is what we want.
        if "already" not in str(exc):
            raise
    ard._instance_functions.add(key)


def register_all(con: duckdb.DuckDBPyConnection, ard: "ARD") -> None:
    """Run ``register(con, ard)`` of every module in ``UDF_MODULES``, in order."""
    ard._pass_functions = {}
    for module_name in UDF_MODULES:
        module = importlib.import_module(f"ard_sql.udfs.{module_name}")
        ard._registering_module = module_name
        try:
            module.register(con, ard)
        finally:
            ard._registering_module = ""


#: ``ard_functions.available_in`` of what ``ard.duckdb`` holds itself and of what needs Python.
EVERYWHERE = "any DuckDB client"
PYTHON_ONLY = "ard_sql.open() and `ard sql`"


def macro_header(sql: str) -> tuple[str, str, str]:
    """(name, signature, first sentence) of a macro file's first comment paragraph ``-- name(args): what``."""
    lines = []
    for line in sql.splitlines():
        if not line.startswith("--") or not line[2:].strip():
            break
        lines.append(line[2:].strip())
    text = " ".join(lines)
    if text.startswith("TEMP "):
        text = text[len("TEMP "):]
    depth, end = 0, -1
    for i, ch in enumerate(text):  # the signature's closing parenthesis (defaults may hold parentheses)
        depth += ch == "("
        depth -= ch == ")"
        if ch == ")" and depth == 0:
            end = i
            break
    if end < 0:
        raise ValueError(f"macro file does not start with '-- name(args): ...': {text[:60]!r}")
    signature, rest = text[: end + 1], text[end + 1:].lstrip(" :")
    name = signature.split("(", 1)[0].strip().strip('"')
    return name, signature, rest.split(". ")[0].rstrip(".")


def function_catalog() -> list[tuple[str, str, str, str]]:
    """Every SQL function and macro an ARD offers: (name, signature, available_in, description).

    The persistent macros of ``sql/macros`` work in any DuckDB client; the UDFs and
    TEMP macros of :data:`UDF_MODULES` need ``ard_sql.open()`` (or ``ard sql``). An
    index-backed TEMP macro that shadows a persistent one is listed under both.
    """
    from ard_sql import sql as packaged_sql

    def macro_row(text: str, where: str) -> tuple[str, str, str, str]:
        name, signature, what = macro_header(text)
        return name, signature, where, what

    rows = [macro_row(packaged_sql.text(rel), EVERYWHERE) for rel in packaged_sql.files("macros")]
    for module_name in UDF_MODULES:
        module = importlib.import_module(f"ard_sql.udfs.{module_name}")
        rows += [(name, signature, PYTHON_ONLY, what)
                 for name, (signature, what) in getattr(module, "SQL_FUNCTIONS", {}).items()]
        rows += [macro_row(packaged_sql.text(rel), PYTHON_ONLY) for rel in getattr(module, "MACRO_FILES", ())]
    return rows
