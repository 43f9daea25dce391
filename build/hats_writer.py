"""Write staging tables (core and every layer) as HATS catalogs.

Layout of one staging table (paths from ``ard_sql.paths``)::

    staging/<layer>/hats.properties    (and its older name ``properties``)
    staging/<layer>/partition_info.csv
    staging/<layer>/_schema.parquet    zero-row file: the stored schema (keeps views typed)
    staging/<layer>/dataset/_metadata, _common_metadata
    staging/<layer>/dataset/Norder=K/Dir=D/Npix=N.parquet

Every table stores its contract columns (``ard_sql.contract``) with Arrow
types derived from the DuckDB types, then ``RA``/``DEC`` where the contract
has none (so each layer is a valid HATS *object* catalog that LSDB can open
and cross-match), then ``_healpix_29``, the HATS spatial index. Rows are
sorted by ``_healpix_29``.

Every file is written under a temporary name beside its target and renamed
(``os.replace``), so a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hats.pixel_math.spatial_index import SPATIAL_INDEX_COLUMN, SPATIAL_INDEX_ORDER, compute_spatial_index

from ard_sql import contract, paths

log = logging.getLogger(__name__)

_SCALAR_TYPES: dict[str, pa.DataType] = {
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "SMALLINT": pa.int16(),
    "TINYINT": pa.int8(),
    "UBIGINT": pa.uint64(),
    "UINTEGER": pa.uint32(),
    "DOUBLE": pa.float64(),
    "FLOAT": pa.float32(),
    "VARCHAR": pa.string(),
    "BOOLEAN": pa.bool_(),
    # ENUMs are stored as strings in Parquet and cast back to the ENUM in the view.
    "WEB_CLASS": pa.string(),
}
_ARRAY_RE = re.compile(r"^(\w+)\[(\d*)\]$")


class SchemaMismatch(ValueError):
    """A layer's output does not match its declared columns."""


def arrow_type(duckdb_type: str) -> pa.DataType:
    """Arrow type used in Parquet for a contract DuckDB type (``FLOAT[768]`` -> fixed-size list)."""
    t = duckdb_type.strip().upper()
    m = _ARRAY_RE.match(t)
    if m:
        inner = arrow_type(m.group(1))
        return pa.list_(inner, int(m.group(2))) if m.group(2) else pa.list_(inner)
    try:
        return _SCALAR_TYPES[t]
    except KeyError:
        raise ValueError(f"no Arrow type for DuckDB type {duckdb_type!r}") from None


def stored_schema(layer: str) -> pa.Schema:
    """Schema of every Parquet file of one staging table (contract + RA/DEC + ``_healpix_29``)."""
    cols = contract.columns(layer)
    fields = [pa.field(c.name, arrow_type(c.type)) for c in cols]
    names = {c.name.lower() for c in cols}
    for extra in ("RA", "DEC"):
        if extra.lower() not in names:
            fields.append(pa.field(extra, pa.float64()))
    fields.append(pa.field(SPATIAL_INDEX_COLUMN, pa.int64()))
    return pa.schema(fields)


def _conform_column(arr: pa.ChunkedArray | pa.Array, target: pa.DataType, name: str, where: str) -> pa.Array:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if name == "Web_Class" and pa.types.is_integer(arr.type):
        # Codes 0-3 are accepted and stored as names.
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        codes = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if np.any((codes[valid] < 0) | (codes[valid] >= len(contract.WEB_CLASSES))):
            raise SchemaMismatch(f"{where}: Web_Class codes must be 0-{len(contract.WEB_CLASSES) - 1}")
        names = np.array(contract.WEB_CLASSES, dtype=object)[np.clip(codes, 0, len(contract.WEB_CLASSES) - 1)]
        arr = pa.array(np.where(valid, names, None), pa.string())
    if pa.types.is_fixed_size_list(target):
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
            raise SchemaMismatch(f"{where}: column {name} must be a list of {target.list_size} floats, got {arr.type}")
        if not pa.types.is_fixed_size_list(arr.type):
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            if np.any(lengths[valid] != target.list_size):
                raise SchemaMismatch(f"{where}: column {name} holds lists whose length is not {target.list_size}")
    try:
        return arr.cast(target, safe=not (pa.types.is_floating(target) or pa.types.is_fixed_size_list(target)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaMismatch(f"{where}: column {name} ({arr.type}) cannot be stored as {target}: {exc}") from exc


def conform_table(table: pa.Table, layer: str, where: str = "") -> pa.Table:
    """Return ``table`` with exactly the layer's contract columns, in order, with stored types.

    Raises :class:`SchemaMismatch` naming missing or unexpected columns.
    """
    where = where or f"layer {layer}"
    cols = contract.columns(layer)
    given = {name.lower(): name for name in table.column_names}
    missing = [c.name for c in cols if c.name.lower() not in given]
    extra = [n for n in table.column_names if n.lower() not in {c.name.lower() for c in cols}]
    if missing or extra:
        raise SchemaMismatch(
            f"{where}: output columns differ from ard_sql.contract"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unexpected: {', '.join(extra)}" if extra else "")
        )
    arrays = [_conform_column(table.column(given[c.name.lower()]), arrow_type(c.type), c.name, where) for c in cols]
    return pa.Table.from_arrays(arrays, schema=pa.schema([pa.field(c.name, arrow_type(c.type)) for c in cols]))


def healpix29(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """HATS spatial index (NESTED order 29 pixel) of positions in degrees.

    The one order-29 pixel function: it writes the stored ``_healpix_29`` and
    ``ard_sql.regions`` tests MOC membership with it, so both agree on pixel
    boundaries (healpy's ``ang2pix`` does not, e.g. at RA 180 or 270, Dec 0).
    """
    return np.asarray(compute_spatial_index(np.asarray(ra, float), np.asarray(dec, float)), dtype=np.int64)


def with_positions(table: pa.Table, layer: str, ra: np.ndarray, dec: np.ndarray) -> pa.Table:
    """Add RA/DEC (when the contract lacks them) and ``_healpix_29``; sort by it; stored schema."""
    names = {n.lower() for n in table.column_names}
    for name, values in (("RA", ra), ("DEC", dec)):
        if name.lower() not in names:
            table = table.append_column(name, pa.array(np.asarray(values, np.float64)))
    table = table.append_column(SPATIAL_INDEX_COLUMN, pa.array(healpix29(ra, dec)))
    table = table.sort_by(SPATIAL_INDEX_COLUMN)
    return table.cast(stored_schema(layer))


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    with paths.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=100_000)


def _atomic_write_text(text: str, path: Path) -> None:
    paths.atomic_write_text(path, text)


def write_schema_file(ard_dir: Path | str, layer: str) -> Path:
    """Write the zero-row ``_schema.parquet`` of a staging table (always, atomically)."""
    path = paths.schema_file(ard_dir, layer)
    _atomic_write_table(stored_schema(layer).empty_table(), path)
    return path


def write_partition(ard_dir: Path | str, layer: str, order: int, pixel: int, table: pa.Table) -> Path:
    """Write one partition file of a staging table; ``table`` must have the stored schema."""
    schema = stored_schema(layer)
    if not table.schema.equals(schema):
        table = table.select(schema.names).cast(schema)
    path = paths.partition_file(ard_dir, order, pixel, layer)
    _atomic_write_table(table, path)
    return path


def upgrade_partition(ard_dir: Path | str, layer: str, order: int, pixel: int) -> list[str]:
    """Rewrite a partition file of an older schema (a partition kept as built by an earlier version) in today's.

    Its rows and the values of every column both schemas share are kept (cast to today's
    type); a column the old file lacks is NULL, one today's contract dropped is removed.
    Returns the changes (``"<column>: NULL (new)"``, ``"<column>: dropped"``, ``"<column>: <old type> -> <type>"``,
    ``"column order"``); empty, and nothing written, when the schema is current. A column that cannot be
    cast is a :class:`SchemaMismatch` naming the file.
    """
    path = paths.partition_file(ard_dir, order, pixel, layer)
    schema = stored_schema(layer)
    old = pq.read_schema(path)
    if old.remove_metadata().equals(schema):
        return []
    table = pq.read_table(path)
    arrays, changes = [], []
    for field in schema:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, field.type))
            changes.append(f"{field.name}: NULL (new)")
            continue
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaMismatch(f"{path}: written by an earlier version; its column {field.name} ({column.type}) "
                                     f"cannot be read as {field.type} ({exc}); rebuild it with `ard build --force`") from None
            changes.append(f"{field.name}: {table.schema.field(field.name).type} -> {field.type}")
        arrays.append(column)
    changes += [f"{name}: dropped" for name in table.column_names if name not in schema.names]
    changes = changes or ["column order"]
    _atomic_write_table(pa.Table.from_arrays(arrays, schema=schema), path)
    return changes


def partition_files(ard_dir: Path | str, layer: str) -> list[tuple[int, int, Path]]:
    """(order, pixel, path) of every partition file of a staging table, sorted."""
    dataset = paths.staging_dir(ard_dir, layer) / "dataset"
    return sorted((*partition_of(f), f) for f in dataset.glob("Norder=*/Dir=*/Npix=*.parquet"))


def partition_of(path: Path) -> tuple[int, int]:
    """(order, pixel) of a partition file's HATS path (``Norder=o/Dir=d/Npix=p.parquet``)."""
    return int(path.parent.parent.name.split("=")[1]), int(path.stem.split("=")[1])


def remove_partitions(ard_dir: Path | str, layer: str, keep: set[tuple[int, int]]) -> list[Path]:
    """Delete partition files of a staging table that are not in ``keep``; return them."""
    removed = []
    for order, pixel, f in partition_files(ard_dir, layer):
        if (order, pixel) not in keep:
            f.unlink()
            removed.append(f)
    return removed


def _properties_text(layer: str, nrows: int, max_rows: int, orders: list[int], size_kb: int) -> str:
    from hats.catalog.dataset.table_properties import TableProperties

    props = TableProperties(
        catalog_name=f"ard_{layer}",
        catalog_type="object",
        total_rows=nrows,
        ra_column="RA",
        dec_column="DEC",
        healpix_column=SPATIAL_INDEX_COLUMN,
        healpix_order=SPATIAL_INDEX_ORDER,
        hats_max_rows=max_rows,
        hats_estsize=size_kb,
    )
    lines = ["#HATS catalog written by ard_sql"]
    for key, value in props.model_dump(by_alias=True, exclude_none=True).items():
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        lines.append(f"{key}={getattr(value, 'value', value)}")
    return "\n".join(lines) + "\n"


def finalize_catalog(ard_dir: Path | str, layer: str) -> int:
    """(Re)write the catalog-level HATS files from the partition files present.

    Writes ``partition_info.csv``, ``dataset/_metadata``, ``dataset/_common_metadata``,
    ``hats.properties`` and ``properties``. Returns the total row count.
    When the table has no partition (left) those files are removed (returns 0):
    they would list files that are gone.
    """
    root = paths.staging_dir(ard_dir, layer)
    files = partition_files(ard_dir, layer)
    if not files:
        for name in ("partition_info.csv", "dataset/_metadata", "dataset/_common_metadata", "hats.properties", "properties"):
            (root / name).unlink(missing_ok=True)
        return 0
    schema = stored_schema(layer)
    combined = None
    nrows = max_rows = size = 0
    for order, pixel, f in files:
        md = pq.read_metadata(f)
        if not md.schema.to_arrow_schema().remove_metadata().equals(schema):  # one _metadata needs one schema
            changes = upgrade_partition(ard_dir, layer, order, pixel)
            log.warning("%s: written by an earlier version; rewritten in today's schema (%s)", f, "; ".join(changes))
            md = pq.read_metadata(f)
        md.set_file_path(f.relative_to(root / "dataset").as_posix())
        nrows += md.num_rows
        max_rows = max(max_rows, md.num_rows)
        size += f.stat().st_size
        if combined is None:
            combined = md
        else:
            combined.append_row_groups(md)
    csv = "Norder,Npix\n" + "".join(f"{o},{p}\n" for o, p, _ in files)
    _atomic_write_text(csv, root / "partition_info.csv")
    meta = root / "dataset" / "_metadata"
    with paths.atomic_path(meta) as tmp:
        combined.write_metadata_file(str(tmp))
    with paths.atomic_path(root / "dataset" / "_common_metadata") as tmp:
        pq.write_metadata(schema, str(tmp))
    text = _properties_text(layer, nrows, max_rows, sorted({o for o, _, _ in files}), size // 1024)
    _atomic_write_text(text, root / "hats.properties")
    _atomic_write_text(text, root / "properties")
    return nrows
