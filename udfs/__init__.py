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
        con.create_function(name, function, parameters, return_type, **kwargs)
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
