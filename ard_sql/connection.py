"""``ard_sql.open()``: a prepared DuckDB connection to an ARD folder.

Preparing a connection is one idempotent step, in a fixed order:

1. settings: the session variable ``ard_dir`` (the folder's real location, so
   the persistent views, whose fallback is the absolute path of the build,
   still find the Parquet files after the folder was moved);
2. UDFs: every module of ``ard_sql.udfs.UDF_MODULES``;
3. macros and views that need Python live in the UDF modules (TEMP objects);
   the persistent ones are already in ``ard.duckdb``.

DuckDB cursors are separate client contexts (their own variables and TEMP
objects), so :meth:`ARD.cursor` prepares each one the same way.

One database file is one DuckDB instance per process, and a Python UDF lives as
long as the connection that created it: were a second ``open()`` of the same
file to use the first one's UDFs, closing the first would leave the second
calling freed functions (a crash). So every ``open()`` of a file shares one
process-wide root connection (:class:`_Database`) that creates the UDFs and
holds the state they load (``cache``: indexes, spectrum readers); each
:class:`ARD` works on its own cursor of it, and the root closes with the last.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import duckdb

from ard_sql import paths


class ARDNotFound(FileNotFoundError):
    """No ARD (no ``ard.duckdb``) where one was expected."""


def _how_to_build(where: Path) -> str:
    if where.is_dir() and (next(where.glob("healpix/**/coadd-*.fits"), None) or next(where.glob("coadd-*.fits"), None)):
        # a DESI source folder (or a mock survey) given where its ARD was meant
        return (f"{where} holds DESI coadd files, not an ARD: build one from it with\n"
                f"    ard build {where} --out {where.parent / (where.name + '_ard')}\n"
                "then open that folder.")
    return (
        f"no ARD found at {where} (missing {paths.DB_FILENAME}). Build one with\n"
        f"    ard mock --out survey --n 2000 && ard build survey --out {where}\n"
        f"or `ard build <folder of DESI coadd/redrock files> --out {where}`, then open it with "
        f"ard_sql.open({str(where)!r}) or set ARD_HOME={where}."
    )


def resolve_ard_dir(path: str | Path | None) -> Path:
    """The ARD folder for ``path`` (a folder, its ``ard.duckdb``, or None for ``paths.ard_home()``)."""
    where = Path(path).expanduser() if path is not None else paths.ard_home()
    if where.suffix == ".duckdb" or where.is_file():
        where = where.parent
    where = where.resolve()
    if not paths.db_path(where).exists():
        raise ARDNotFound(_how_to_build(where))
    return where


class _Database:
    """One database file opened by this process: the root connection that owns the UDFs, their shared ``cache``
    and the names already created, and how many :class:`ARD` objects use it."""

    def __init__(self, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        self.con = con
        self.read_only = read_only
        self.cache: dict[str, Any] = {}
        self.functions: set[str] = set()
        self.users = 0

    def close(self) -> None:
        """Release what the UDFs loaded, then the root connection."""
        for item in self.cache.values():
            if hasattr(item, "close"):
                item.close()
        self.cache.clear()
        self.con.close()


_DATABASES: dict[Path, _Database] = {}
_DATABASES_LOCK = threading.Lock()


class ARD:
    """An open ARD: a DuckDB connection whose views, types and UDFs are ready.

    Attributes: ``path`` (the ARD folder), ``read_only``, ``con`` (the
    prepared DuckDB connection) and ``cache`` (per-ARD state that UDF modules
    load lazily, e.g. the TargetID lookup of ``spectrum``).
    """

    def __init__(self, path: str | Path | None = None, *, read_only: bool = True) -> None:
        ard_dir = resolve_ard_dir(path)
        with _DATABASES_LOCK:
            db = _DATABASES.get(ard_dir)
            if db is None:
                db = _DATABASES[ard_dir] = _Database(duckdb.connect(str(paths.db_path(ard_dir)), read_only=read_only),
                                                     read_only)
            elif db.read_only != read_only:
                raise ValueError(f"{ard_dir} is already open with read_only={db.read_only} in this process; DuckDB "
                                 "opens a file one way at a time: close the other ARD first")
            db.users += 1
        self._db, self._key = db, ard_dir
        con = None
        try:
            con = db.con.cursor()
            self._setup(ard_dir, con, read_only)
        except BaseException:
            if con is not None:
                con.close()  # a failed prepare() must not leave the database file open
            self._leave()
            raise

    def _setup(self, ard_dir: Path, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        """The per-ARD state, over the shared database ``self._db`` the caller set."""
        self.path: Path = ard_dir
        self.read_only = read_only
        self.cache: dict[str, Any] = self._db.cache
        self._instance_functions: set[str] = self._db.functions
        self._pass_functions: dict[str, str] = {}
        self._registering_module = ""
        self._prepared: set[int] = set()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self.con: duckdb.DuckDBPyConnection = con
        self.prepare(self.con)

    @classmethod
    def attach(cls, con: duckdb.DuckDBPyConnection, ard_dir: str | Path) -> "ARD":
        """Prepare an existing connection for ``ard_dir`` (used by the build while it writes ``ard.duckdb``)."""
        self = cls.__new__(cls)
        self._db, self._key = _Database(con, read_only=False), None  # the caller's own connection: not shared
        self._db.users = 1
        self._setup(Path(ard_dir).resolve(), con, False)
        return self

    @property
    def function_owner(self) -> duckdb.DuckDBPyConnection:
        """The connection that creates this database's UDFs (lives as long as any ARD open on the file)."""
        return self._db.con

    # ------------------------------------------------------------ preparing
    def prepare(self, con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
        """Prepare ``con`` (settings, UDFs, TEMP macros/views); a second call is a no-op."""
        from ard_sql.udfs import register_all

        with self._lock:
            if id(con) in self._prepared:
                return con
            con.execute("SET VARIABLE ard_dir = ?", [self.path.as_posix()])
            register_all(con, self)
            self._prepared.add(id(con))
        return con

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor (own client context, for another thread) prepared like ``con``."""
        cur = self.con.cursor()
        self._cursors.append(cur)  # keep it alive: the prepared-set is keyed by id()
        try:
            return self.prepare(cur)
        except BaseException:
            self.release(cur)
            raise

    def release(self, cur: duckdb.DuckDBPyConnection) -> None:
        """Close one cursor from :meth:`cursor` and forget it (idempotent; safe from a finalizer).

        Lock-free on purpose: it may run from garbage collection while this
        thread holds ``_lock`` in :meth:`prepare`.
        """
        self._prepared.discard(id(cur))  # before the object can die and its id be reused
        try:
            cur.close()
        except duckdb.Error:
            pass
        try:
            self._cursors.remove(cur)
        except ValueError:
            pass

    # ------------------------------------------------------------ querying
    def query(self, where: str | None, columns: Any = None, output: str = "pandas", **kwargs: Any) -> Any:
        """Filter ``ard`` with the blueprint's syntax; see :func:`ard_sql.query.query`."""
        from ard_sql.query import query

        return query(self, where, columns, output, **kwargs)

    def find_similar(self, targetid: int | None = None, vector: Any = None, k: int = 50,
                     embedding: str = "astro", where: str | None = None) -> Any:
        """The ``k`` nearest neighbours as a DataFrame joined with ``ard``; see :func:`ard_sql.similarity.find_similar`."""
        from ard_sql.similarity import find_similar

        return find_similar(self, targetid=targetid, vector=vector, k=k, embedding=embedding, where=where)

    def sql(self, query: str, params: Any = None) -> duckdb.DuckDBPyRelation:
        """Run ``query`` (with ``?``/``$name`` parameters) and return a DuckDB relation."""
        if params is None:
            return self.con.sql(query)
        return self.con.sql(query, params=params)

    def execute(self, query: str, params: Any = None) -> duckdb.DuckDBPyConnection:
        """``con.execute`` (for statements that need no relation)."""
        return self.con.execute(query, params) if params is not None else self.con.execute(query)

    def tables(self) -> list[str]:
        """Names of the views and tables of the ARD."""
        rows = self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database() ORDER BY 1"
        ).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close every cursor and the connection; the last ARD open on the file also releases what its UDFs loaded
        (memory-mapped indexes, spectrum readers) and the root connection. A second call does nothing."""
        if self._db is None:
            return
        for cur in list(self._cursors):
            try:
                cur.close()
            except duckdb.Error:
                pass
        self._cursors.clear()
        if self.con is not self._db.con:
            self.con.close()
        self._leave()

    def _leave(self) -> None:
        """Stop using the shared database; the last user closes it."""
        db, self._db = self._db, None
        with _DATABASES_LOCK:
            db.users -= 1
            if db.users > 0:
                return
            if self._key is not None and _DATABASES.get(self._key) is db:
                del _DATABASES[self._key]
        db.close()

    def __enter__(self) -> "ARD":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ARD {self.path} read_only={self.read_only}>"


def open(path: str | Path | None = None, *, read_only: bool = True) -> ARD:  # noqa: A001 - the public name
    """Open an ARD folder (or its ``ard.duckdb``); default ``$ARD_HOME`` or the per-user data folder.

    Returns an :class:`ARD` whose ``.sql(query, params=None)`` gives a DuckDB
    relation, with every UDF registered. Raises :class:`ARDNotFound` with a
    message saying how to build one when there is no ARD there.
    """
    return ARD(path, read_only=read_only)
