-- Staging view of one layer: every Parquet file of its HATS catalog, including
-- the zero-row `_schema.parquet`, so the view opens (typed) before the layer
-- has run, and partition files written later appear without re-creating it.
-- The folder comes from the session variable `ard_dir` (set by ard_sql.open(),
-- so a moved ARD works), else from the absolute path baked in at build time
-- (so the plain DuckDB CLI works from any working directory).
-- Placeholders (Python str.format): view, columns, layer, ard_dir (an SQL string literal),
-- filename (true for core: its Norder and Npix columns are read from the file names).
CREATE OR REPLACE VIEW {view} AS
SELECT {columns}
FROM read_parquet(coalesce(getvariable('ard_dir'), {ard_dir}) || '/staging/{layer}/**/*.parquet', filename = {filename});
