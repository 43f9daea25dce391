"""``db.query``: the blueprint's filter syntax, checked and translated to SQL.

A researcher writes the filter the way the blueprint does::

    db.query("LogMass_p50 > 11.0 & Web_Class == 'Void' & SNR_Median > 10",
             columns=["TargetID", "LogMass_p50", "Dist_Filament"])

or as a plain SQL expression (``AND``/``OR``/``NOT``, ``BETWEEN``, ``IN``,
``LIKE``, ``IS NULL``, arithmetic, allowed functions). ``&``, ``|`` and ``~``
are the logical and/or/not of pandas (with their low precedence), and ``==``
is ``=``. As in pandas, between two integers they are bitwise: a flag test is
``(PPXF_flag & 8) == 0``, and an integer standing alone as a condition means
"non-zero" (``Topology_flag & 256`` selects the galaxies with that bit). An
integer joined by ``&``/``|`` to a condition is refused with a hint, because
the low precedence makes ``PPXF_flag & 8 == 0`` read ``PPXF_flag & (8 == 0)``.
A string compared with an ENUM column (``Web_Class``) must be one of its
values: ``Web_Class == 'void'`` is an error, not an empty answer.

The filter is parsed with ``sqlglot`` and checked node by node: only known
columns (``ard_sql.contract.all_columns()``), literals, operators and an
allow-list of functions pass. Statements, ``;``, subqueries, ``*`` and unknown
names are rejected with a :class:`QueryError` saying what and where.

When the ``ard`` view reads the build's compacted table (chosen when
``ard.duckdb`` was written, :func:`reads_wide`) a query reads it alone, no
join; otherwise only the staging tables a query names are joined (core LEFT
JOIN the layers that own its columns, the same rows as the ``ard`` view). Either way a query on core and topology columns never reads
the embedding columns.

Sky regions in a filter read only the partitions they overlap:
``cone(ra0, dec0, radius_deg)`` and ``in_region('POLYGON ...' | 'MOC ...' |
'CIRCLE ...')`` as a top-level AND term narrow every joined table to the
partition files that overlap the region (file list computed in Python with
healpy/mocpy, see :mod:`ard_sql.regions`) and add an exact test on RA/DEC.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.tokens import TokenType

from ard_sql import contract, paths, regions
from ard_sql.build.database import quote_ident, quote_literal

Output = Literal["pandas", "arrow", "astropy", "batches"]
OUTPUTS: tuple[str, ...] = ("pandas", "arrow", "astropy", "batches")

#: Columns a filter may use beyond the contract: the HATS spatial index of the core table.
PARTITION_COLUMNS: tuple[str, ...] = ("_healpix_29",)

#: Functions a filter may call (lower case). Pure, row-wise, no I/O.
ALLOWED_FUNCTIONS: frozenset[str] = frozenset(
    {
        "abs", "sqrt", "cbrt", "exp", "ln", "log", "log10", "log2", "pow", "power", "sign",
        "floor", "ceil", "ceiling", "round", "greatest", "least", "coalesce", "ifnull", "nullif",
        "isnan", "isinf", "isfinite", "sin", "cos", "tan", "asin", "acos", "atan", "atan2",
        "radians", "degrees", "pi", "lower", "upper", "length", "starts_with", "ends_with",
        "contains", "cast", "try_cast", "if", "array_length", "len",
        # sky regions (rewritten to a pruning predicate plus an exact test)
        "cone", "in_region",
    }
)

_ALLOWED_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.And, exp.Or, exp.Not,
    exp.Paren, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Is, exp.In, exp.Between,
    exp.Like, exp.ILike, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.IntDiv, exp.Mod, exp.Neg,
    exp.BitwiseRightShift, exp.BitwiseLeftShift, exp.DataType, exp.Case, exp.If, exp.Tuple,
)

_STATEMENTS: tuple[type[exp.Expression], ...] = (
    exp.Select, exp.Subquery, exp.Union, exp.Insert, exp.Update, exp.Delete, exp.Create,
    exp.Drop, exp.Command, exp.Pragma, exp.Set, exp.Use, exp.Describe, exp.Copy, exp.Alter,
)


class QueryError(ValueError):
    """A filter or column list that ``db.query`` refuses, with what and where."""


def known_columns() -> dict[str, str]:
    """Lower-case name -> canonical name of every column a filter may use."""
    names = [c.name for c in contract.all_columns()] + list(PARTITION_COLUMNS)
    return {n.lower(): n for n in names}


def _where(text: str, start: int, end: int | None = None) -> str:
    """A caret line pointing at ``text[start:end]`` (for error messages)."""
    end = start if end is None else end
    return f"\n  {text}\n  {' ' * start}{'^' * max(1, end - start + 1)}"


def _pandas_to_sql(text: str) -> str:
    """Replace the pandas operators ``& | ~ ==`` by ``AND OR NOT =`` (token-exact)."""
    try:
        tokens = DuckDB().tokenize(text)
    except sqlglot.errors.TokenError as err:
        raise QueryError(f"cannot read the filter: {err}") from None
    replace = {TokenType.AMP: " AND ", TokenType.PIPE: " OR ", TokenType.TILDE: " NOT ", TokenType.EQ: " = "}
    out, pos = [], 0
    for tok in tokens:
        if tok.token_type == TokenType.SEMICOLON:
            raise QueryError("';' is not allowed: a filter is one expression, not statements" + _where(text, tok.start))
        if tok.token_type in _STATEMENT_TOKENS:
            raise QueryError(f"{tok.text.upper()!r} is not allowed in a filter (statements and subqueries are refused)" + _where(text, tok.start, tok.end))
        if tok.token_type in replace:
            out.append(text[pos : tok.start])
            out.append(replace[tok.token_type])
            pos = tok.end + 1
    out.append(text[pos:])
    return "".join(out)


_STATEMENT_TOKENS = {
    TokenType.SELECT, TokenType.INSERT, TokenType.UPDATE, TokenType.DELETE, TokenType.CREATE,
    TokenType.DROP, TokenType.FROM, TokenType.WITH, TokenType.UNION, TokenType.PRAGMA,
    TokenType.ALTER, TokenType.COPY, TokenType.ATTACH, TokenType.DETACH, TokenType.INTO,
}


def _function_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return node.sql_name().lower()


def _check_node(node: exp.Expression, sql: str, columns: dict[str, str]) -> None:
    meta = getattr(node, "meta", None) or {}
    here = _where(sql, meta["start"], meta.get("end")) if "start" in meta else f"\n  in: {node.sql(dialect='duckdb')}"
    if isinstance(node, _STATEMENTS):
        raise QueryError(f"{type(node).__name__.lower()} is not allowed in a filter (statements and subqueries are refused): {node.sql()[:80]}")
    if isinstance(node, exp.Star):
        raise QueryError("'*' is not allowed in a filter; name the columns")
    if isinstance(node, exp.Column):
        ident = node.this
        name = str(node.name)
        if node.table:
            raise QueryError(f"qualified column {node.sql()!r} is not allowed; write the bare column name" + _ident_where(sql, ident))
        if name.lower() not in columns:
            hint = difflib.get_close_matches(name.lower(), list(columns), n=3, cutoff=0.6)
            did = f"; did you mean {', '.join(columns[h] for h in hint)}?" if hint else ""
            raise QueryError(f"unknown column {name!r}{did}" + _ident_where(sql, ident))
        return
    if isinstance(node, _ALLOWED_NODES):
        return
    if isinstance(node, exp.Func):
        fname = _function_name(node)
        if fname not in ALLOWED_FUNCTIONS:
            raise QueryError(
                f"function {fname!r} is not allowed in a filter; allowed: {', '.join(sorted(ALLOWED_FUNCTIONS))}"
                + _where_text(sql, fname)
            )
        return
    if isinstance(node, (exp.Array,)):
        return
    if not isinstance(node, _ALLOWED_NODES):
        raise QueryError(f"{type(node).__name__} ({node.sql(dialect='duckdb')[:60]!r}) is not allowed in a filter" + here)


def _ident_where(sql: str, ident: exp.Expression) -> str:
    meta = getattr(ident, "meta", None) or {}
    if "start" in meta:
        return _where(sql, meta["start"], meta.get("end"))
    return ""


def _where_text(sql: str, word: str) -> str:
    i = sql.lower().find(word.lower())
    return _where(sql, i, i + len(word) - 1) if i >= 0 else ""


def parse_filter(text: str, *, condition: bool = True) -> exp.Expression:
    """Parse and check a filter; return the sqlglot expression (not yet rewritten).

    Raises :class:`QueryError` for statements, ``;``, subqueries, unknown
    columns or functions, and anything that is not a row-wise expression.
    ``condition=False`` checks an expression that is not a condition (an
    ``order_by`` key): an integer standing alone then stays an integer.
    """
    if not isinstance(text, str) or not text.strip():
        raise QueryError("the filter is empty; give an expression such as \"LogMass_p50 > 11 & SNR_Median > 10\"")
    sql = _pandas_to_sql(text)
    try:
        parsed = sqlglot.parse(sql, read="duckdb")
    except sqlglot.errors.ParseError as err:
        raise QueryError(f"cannot parse the filter {text!r}: {err.errors[0]['description'] if err.errors else err}") from None
    parsed = [p for p in parsed if p is not None]
    if len(parsed) != 1:
        raise QueryError(f"a filter must be exactly one expression, got {len(parsed)}")
    tree = parsed[0]
    columns = known_columns()
    for node in tree.walk():
        _check_node(node, sql, columns)
    types = {c.name.lower(): c.type for c in contract.all_columns()}
    _check_enum_literals(tree, types)
    # children first: '(a & 12) & 8' must see its inner '&' already bitwise to know that it joins two integers
    tree = _bottom_up(tree, lambda node: _bitwise_between_integers(node, types))
    if condition and _kind(tree, types) == "int":  # an integer as the whole condition: non-zero, as pandas reads it
        tree = exp.NEQ(this=exp.paren(tree, copy=False), expression=exp.Literal.number(0))
    return tree


def _bottom_up(node: exp.Expression, fn: Callable[[exp.Expression], exp.Expression]) -> exp.Expression:
    """Apply ``fn`` to every node of the tree, children before their parent (sqlglot's ``transform`` goes top-down)."""
    for key, value in list(node.args.items()):
        if isinstance(value, exp.Expression):
            node.set(key, _bottom_up(value, fn))
        elif isinstance(value, list):
            node.set(key, [_bottom_up(v, fn) if isinstance(v, exp.Expression) else v for v in value])
    return fn(node)


_INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
_INTEGER_OPS = (exp.BitwiseAnd, exp.BitwiseOr, exp.BitwiseXor, exp.BitwiseLeftShift, exp.BitwiseRightShift,
                exp.BitwiseNot, exp.Add, exp.Sub, exp.Mul, exp.Mod, exp.IntDiv)
#: Values of the ENUM types a filter may compare with strings.
_ENUM_VALUES: dict[str, list[str]] = {"WEB_CLASS": contract.WEB_CLASSES}


def _kind(node: exp.Expression, types: dict[str, str]) -> str:
    """'bool', 'int' or 'other': what a filter sub-expression yields, as far as it can be told."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, (exp.Predicate, exp.Connector, exp.Not, exp.Boolean)):
        return "bool"
    if isinstance(node, exp.Column):
        t = types.get(str(node.name).lower(), "")
        return "int" if t in _INTEGER_TYPES else "other"
    if isinstance(node, exp.Literal) and not node.is_string:
        return "int" if node.is_int else "other"
    if isinstance(node, exp.Neg):
        return _kind(node.this, types)
    if isinstance(node, _INTEGER_OPS):
        parts = [a for a in (node.this, node.args.get("expression")) if a is not None]
        return "int" if all(_kind(a, types) == "int" for a in parts) else "other"
    return "other"


def _bitwise_between_integers(node: exp.Expression, types: dict[str, str]) -> exp.Expression:
    """``&`` / ``|`` / ``~`` (read as AND / OR / NOT) between integers become bitwise, as in pandas."""
    if isinstance(node, (exp.And, exp.Or)):
        kinds = (_kind(node.this, types), _kind(node.expression, types))
        if kinds == ("int", "int"):
            op = exp.BitwiseAnd if isinstance(node, exp.And) else exp.BitwiseOr
            return op(this=node.this, expression=node.expression)
        if "int" in kinds:
            word = "&" if isinstance(node, exp.And) else "|"
            raise QueryError(
                f"'{word}' joins an integer and a condition in {node.sql(dialect='duckdb')!r}: in a filter '&' and '|' "
                "bind more loosely than comparisons (as in pandas' query), so 'PPXF_flag & 8 == 0' reads "
                "'PPXF_flag & (8 == 0)'. Put the bit test in parentheses, '(PPXF_flag & 8) == 0', or write "
                "'(Topology_flag & 256) != 0' for a set bit.")
    if isinstance(node, exp.Not) and _kind(node.this, types) == "int":
        return exp.BitwiseNot(this=node.this)
    return node


def _check_enum_literals(tree: exp.Expression, types: dict[str, str]) -> None:
    """A string compared with an ENUM column must be one of its values (else DuckDB answers nothing)."""
    for node in tree.walk():
        if not isinstance(node, (exp.EQ, exp.NEQ, exp.In)):
            continue
        col, values = (node.this, node.expressions if isinstance(node, exp.In) else [node.expression])
        if not isinstance(node, exp.In) and isinstance(node.expression, exp.Column):  # 'Void' == Web_Class
            col, values = node.expression, [node.this]
        if not isinstance(col, exp.Column):
            continue
        allowed = _ENUM_VALUES.get(types.get(str(col.name).lower(), ""))
        if allowed is None:
            continue
        for v in values:
            if isinstance(v, exp.Literal) and v.is_string and v.this not in allowed:
                hint = difflib.get_close_matches(v.this.capitalize(), allowed, n=1)
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                raise QueryError(f"{col.name} is one of {', '.join(repr(a) for a in allowed)}, not {v.this!r}{did}")


def _literal_number(node: exp.Expression) -> float:
    if isinstance(node, exp.Neg):
        return -_literal_number(node.this)
    if isinstance(node, exp.Paren):
        return _literal_number(node.this)
    if isinstance(node, exp.Literal) and not node.is_string:
        return float(node.this)
    raise QueryError(f"region arguments must be numbers, got {node.sql()!r}")


def _top_level_conjuncts(tree: exp.Expression) -> list[exp.Expression]:
    node = tree.unnest() if isinstance(tree, exp.Paren) else tree
    if isinstance(node, exp.And):
        return _top_level_conjuncts(node.this) + _top_level_conjuncts(node.expression)
    return [node]


def _region_of(node: exp.Expression) -> regions.Region | None:
    """The region of a ``cone(ra0, dec0, r)`` / ``in_region('...')`` call, else None."""
    if not isinstance(node, exp.Anonymous):
        return None
    name = str(node.name).lower()
    if name == "cone":
        if len(node.expressions) != 3:
            raise QueryError(f"cone takes (ra0, dec0, radius_deg) in a filter, got {len(node.expressions)} arguments: {node.sql()}")
        ra0, dec0, rad = (_literal_number(a) for a in node.expressions)
        try:
            return regions.Cone(ra0, dec0, rad)
        except ValueError as err:
            raise QueryError(str(err)) from None
    if name == "in_region":
        arg = node.expressions[0] if len(node.expressions) == 1 else None
        if not (isinstance(arg, exp.Literal) and arg.is_string):
            raise QueryError("in_region(...) takes one string: 'CIRCLE ra dec r', 'POLYGON ra1 dec1 ra2 dec2 ...' or 'MOC 5/12-15 ...'")
        try:
            return regions.parse_region(arg.this)
        except ValueError as err:
            raise QueryError(str(err)) from None
    return None


def rewrite_filter(tree: exp.Expression) -> tuple[exp.Expression, regions.Region | None]:
    """Rewrite a checked filter into SQL over the contract columns.

    Returns the expression and the region to prune partitions with: the first
    ``cone``/``in_region`` that is a top-level AND term (a region under OR or
    NOT cannot prune). Rewrites:

    - ``cone(ra0, dec0, r)`` and ``in_region('...')`` become an exact test on RA/DEC;
    - ``Web_Class`` compared with an integer code compares ``Web_Class_Code``.
    """
    prune = None
    for node in _top_level_conjuncts(tree):
        prune = _region_of(node)
        if prune is not None:
            break

    def visit(node: exp.Expression) -> exp.Expression:
        region = _region_of(node)
        if region is not None:
            return exp.paren(sqlglot.parse_one(region.sql_exact(), read="duckdb"))
        if isinstance(node, (exp.EQ, exp.NEQ)):
            left, right = node.this, node.expression
            for col, lit in ((left, right), (right, left)):
                if isinstance(col, exp.Column) and str(col.name).lower() == "web_class" and isinstance(lit, exp.Literal) and not lit.is_string:
                    col.set("this", exp.to_identifier("Web_Class_Code"))
        return node

    return tree.copy().transform(visit), prune


def filter_to_sql(text: str) -> str:
    """Translate a filter (blueprint or SQL syntax) into a checked DuckDB WHERE clause."""
    tree, _ = rewrite_filter(parse_filter(text))
    return tree.sql(dialect="duckdb")


_ORDER_KEY = re.compile(r"^(?P<expr>.*?)(?:\s+(?P<dir>ASC|DESC))?(?:\s+NULLS\s+(?P<nulls>FIRST|LAST))?\s*$", re.I | re.S)


def order_by_to_sql(text: str) -> tuple[str, set[str]]:
    """Translate ``order_by`` into a checked ORDER BY list and the (lower-case) columns it names: comma-separated
    expressions of ``ard`` columns (checked as filters are), each optionally followed by ``ASC``/``DESC`` and
    ``NULLS FIRST``/``NULLS LAST``."""
    keys, used = [], set()
    for part in _split_top_level_commas(text):
        m = _ORDER_KEY.match(part)
        tree, _ = rewrite_filter(parse_filter(m["expr"], condition=False))
        used |= {str(c.name).lower() for c in tree.find_all(exp.Column)}
        key = tree.sql(dialect="duckdb")
        if m["dir"]:
            key += f" {m['dir'].upper()}"
        if m["nulls"]:
            key += f" NULLS {m['nulls'].upper()}"
        keys.append(key)
    return ", ".join(keys), used


def _split_top_level_commas(text: str) -> list[str]:
    """``text`` cut at the commas outside parentheses and brackets (tokens, so commas in strings stay)."""
    try:
        tokens = DuckDB().tokenize(text)
    except sqlglot.errors.TokenError as err:
        raise QueryError(f"cannot read order_by {text!r}: {err}") from None
    depth, start, parts = 0, 0, []
    for tok in tokens:
        if tok.token_type in (TokenType.L_PAREN, TokenType.L_BRACKET):
            depth += 1
        elif tok.token_type in (TokenType.R_PAREN, TokenType.R_BRACKET):
            depth -= 1
        elif tok.token_type == TokenType.COMMA and depth == 0:
            parts.append(text[start:tok.start])
            start = tok.end + 1
    parts.append(text[start:])
    if any(not p.strip() for p in parts):
        raise QueryError(f"order_by {text!r} has an empty key")
    return parts


def _check_columns(columns: Iterable[str] | None) -> list[str]:
    known = known_columns()
    if columns is None:
        return [c.name for c in contract.all_columns()]
    columns = [columns] if isinstance(columns, str) else list(columns)
    out = []
    for name in columns:
        key = str(name).lower()
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
            did = f"; did you mean {', '.join(known[h] for h in hint)}?" if hint else ""
            raise QueryError(f"unknown column {name!r} in columns={columns!r}{did}")
        out.append(known[key])
    if not out:
        raise QueryError("columns=[] selects nothing; leave it out for every column")
    return out


def _layer_of_column() -> dict[str, str]:
    out: dict[str, str] = {}
    for layer, cols in contract.LAYER_COLUMNS.items():
        for c in cols:
            out.setdefault(c.name.lower(), layer)
    out["_healpix_29"] = paths.CORE
    return out


def typed_scan(layer: str, files_sql: str) -> str:
    """A typed scan of one staging table over ``read_parquet(<files_sql>)`` (casts as in its view)."""
    casts = [f"CAST({quote_ident(c.name)} AS {c.type}) AS {quote_ident(c.name)}" for c in contract.columns(layer)]
    if layer in (paths.CORE, contract.WIDE):
        casts.append(quote_ident("_healpix_29"))
    return f"(SELECT {', '.join(casts)} FROM read_parquet({files_sql})) AS {quote_ident(layer)}"


def join_sql(scans: dict[str, str]) -> str:
    """``core LEFT JOIN <layer> USING (TargetID) ...`` over the given scans, in contract order."""
    ordered = [scans[name] for name in contract.LAYER_COLUMNS if name in scans]
    return ordered[0] + "".join(f" LEFT JOIN {s} USING (TargetID)" for s in ordered[1:])


def reads_wide(con: duckdb.DuckDBPyConnection) -> bool:
    """True when the database on ``con`` was written over the compacted ``wide`` table.

    ``ard.duckdb`` defines a ``wide`` view exactly when its ``ard`` view reads
    that table (build/database.py), so ``db.query`` and the ``cone_search`` /
    ``region_search`` macros follow the ``ard`` view's build-time choice with
    one catalog lookup instead of a stat of every partition file.
    """
    return bool(con.execute(
        "SELECT count(*) FROM duckdb_views() WHERE view_name = 'wide' AND NOT internal").fetchall()[0][0])


def _file_list(files: Iterable[Path]) -> str:
    """A DuckDB list literal of file paths, for ``read_parquet``."""
    return "[" + ", ".join(quote_literal(Path(f).as_posix()) for f in files) + "]"


def source_sql(layers: Iterable[str], ard_dir: Path | str | None = None, region: regions.Region | None = None,
               compacted: bool = False) -> str:
    """FROM clause: core LEFT JOIN the needed layers on TargetID.

    The same rows as the ``ard`` view (which joins every layer), but only the
    staging tables a query names are read. With ``region`` (and ``ard_dir``),
    each table is read from the partition files overlapping the region only:
    the file list is narrowed in Python, before DuckDB plans the query.
    ``compacted``: read the ``wide`` table (see :func:`reads_wide`).
    """
    if ard_dir is not None and compacted:
        # One table, no joins (build/compaction.py); same rows and columns.
        return typed_scan(contract.WIDE, _file_list(regions.partition_files(ard_dir, contract.WIDE, region)))
    wanted = set(layers) | {paths.CORE}
    if region is not None and ard_dir is not None:
        scans = {}
        for name in wanted:
            scans[name] = typed_scan(name, _file_list(regions.partition_files(ard_dir, name, region)))
    else:
        scans = {name: quote_ident(name) for name in wanted}
    return join_sql(scans)


def build_sql(
    where: str | None,
    columns: Iterable[str] | None = None,
    *,
    ard_dir: Path | str | None = None,
    limit: int | None = None,
    order_by: str | None = None,
    compacted: bool = False,
) -> str:
    """The full SELECT that ``db.query`` runs (useful to inspect or EXPLAIN).

    ``compacted``: whether to read the ``wide`` table (with ``ard_dir``);
    ``db.query`` passes :func:`reads_wide` of its connection, as the ``ard`` view does.
    """
    names = _check_columns(columns)
    used = {n.lower() for n in names}
    parts: list[str] = []
    region = None
    if where is not None and str(where).strip():
        tree, region = rewrite_filter(parse_filter(where))
        used |= {str(c.name).lower() for c in tree.find_all(exp.Column)}
        parts.append(f" WHERE {tree.sql(dialect='duckdb')}")
    if order_by:
        order_sql, order_cols = order_by_to_sql(order_by)
        used |= order_cols
        parts.append(f" ORDER BY {order_sql}")
    if limit is not None:
        if int(limit) < 0:
            raise QueryError(f"limit must be >= 0, got {limit}")
        parts.append(f" LIMIT {int(limit)}")
    owner = _layer_of_column()
    layers = {owner[u] for u in used if u in owner}
    select = ", ".join(quote_ident(n) for n in names)
    return f"SELECT {select} FROM {source_sql(layers, ard_dir, region, compacted)}" + "".join(parts)


def _to_astropy(table: pa.Table) -> Any:
    """Arrow table -> astropy Table, with units from the column contract."""
    import astropy.units as u
    import numpy as np
    from astropy.table import Table

    from astropy.table import MaskedColumn

    cols = {}
    for name, col in zip(table.column_names, table.columns):
        col = col.combine_chunks()
        null = col.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_fixed_size_list(col.type):
            # a NULL vector has no child values: fill its row so the (n, N) array keeps its shape
            filled = col.fill_null(pa.scalar([np.nan] * col.type.list_size, col.type)) if null.any() else col
            data = filled.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
            mask = np.repeat(null[:, None], col.type.list_size, axis=1)
        elif pa.types.is_list(col.type) or pa.types.is_dictionary(col.type) or pa.types.is_string(col.type):
            data, mask = np.asarray(col.to_pylist(), dtype=object), null
        elif null.any() and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            # NULL stays masked (not NaN), and integers stay integers, as astropy users expect
            data, mask = col.fill_null(pa.scalar(0, col.type) if not pa.types.is_boolean(col.type) else False).to_numpy(
                zero_copy_only=False), null
        else:
            data, mask = col.to_numpy(zero_copy_only=False), null
        cols[name] = MaskedColumn(data, mask=mask) if mask.any() else data
    out = Table(cols, names=table.column_names)
    units = {c.name.lower(): c.unit for c in contract.all_columns()}
    for name in out.colnames:
        unit = units.get(name.lower())
        if unit:
            try:
                out[name].unit = u.Unit(unit, parse_strict="silent")
            except (ValueError, TypeError):
                pass  # a unit astropy cannot parse stays in the column comment only
    return out


def run_query(
    con: duckdb.DuckDBPyConnection,
    where: str | None,
    columns: Iterable[str] | None = None,
    output: Output = "pandas",
    *,
    ard_dir: Path | str | None = None,
    limit: int | None = None,
    order_by: str | None = None,
    batch_size: int = 1_000_000,
) -> Any:
    """Run a checked filter on the ``ard`` view of ``con`` and return the result.

    ``output``: ``'pandas'`` (DataFrame), ``'arrow'`` (pyarrow Table),
    ``'astropy'`` (Table with units from the contract) or ``'batches'`` (a
    ``pyarrow.RecordBatchReader`` that streams ``batch_size`` rows at a time,
    so a large result never sits whole in memory). ``limit`` caps the rows;
    ``order_by`` sorts them: comma-separated expressions of ``ard`` columns,
    each optionally followed by ``ASC``/``DESC`` and ``NULLS FIRST``/``LAST``
    (e.g. ``"LogMass_p50 DESC, TargetID"``).
    """
    if output not in OUTPUTS:
        raise QueryError(f"output={output!r} is not one of {', '.join(OUTPUTS)}")
    sql = build_sql(where, columns, ard_dir=ard_dir, limit=limit, order_by=order_by,
                    compacted=ard_dir is not None and reads_wide(con))
    if output == "batches":
        return con.sql(sql).to_arrow_reader(batch_size)
    if output == "pandas":
        return con.sql(sql).df()
    table = con.sql(sql).to_arrow_table(batch_size)
    if output == "arrow":
        return table
    return _to_astropy(table)


def query(db: Any, where: str | None, columns: Iterable[str] | None = None, output: Output = "pandas", **kwargs: Any) -> Any:
    """``db.query(...)`` for an open ARD (``ard_sql.open()``) or a raw DuckDB connection.

    See :func:`run_query` for the arguments. ``output='batches'`` runs on a
    new cursor, so a half-read stream never blocks ``db`` itself; that cursor
    is closed when the stream is exhausted or garbage-collected.
    """
    raw = isinstance(db, duckdb.DuckDBPyConnection)
    ard_dir = kwargs.pop("ard_dir", None) or (None if raw else db.path)
    if output != "batches":
        return run_query(db if raw else db.con, where, columns, output, ard_dir=ard_dir, **kwargs)
    cur = db.cursor()
    release: Callable[[], None] = cur.close if raw else (lambda: db.release(cur))
    try:
        reader = run_query(cur, where, columns, output, ard_dir=ard_dir, **kwargs)
    except BaseException:
        release()
        raise
    return pa.RecordBatchReader.from_batches(reader.schema, _ReleasingBatches(reader, release))


class _ReleasingBatches:
    """The batches of ``reader``; calls ``release`` (closes the query's cursor) once, when
    the batches are exhausted, reading fails, or the stream is garbage-collected unread."""

    def __init__(self, reader: pa.RecordBatchReader, release: Callable[[], None]) -> None:
        self._reader: pa.RecordBatchReader | None = reader
        self._release = release

    def __iter__(self) -> "_ReleasingBatches":
        return self

    def __next__(self) -> pa.RecordBatch:
        if self._reader is None:
            raise StopIteration
        try:
            return self._reader.read_next_batch()
        except BaseException:  # StopIteration at the end, or a failed read
            self.close()
            raise

    def close(self) -> None:
        """Close the DuckDB reader, then release the cursor (idempotent)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            finally:
                self._release()

    def __del__(self) -> None:
        self.close()
