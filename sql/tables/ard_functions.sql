-- Every SQL function and macro of this ARD, and where it works: 'any DuckDB client' (stored in
-- ard.duckdb) or 'ard_sql.open() and `ard sql`' (Python functions and TEMP macros, registered on
-- each connection). A plain client that reports a function missing can look it up here.
-- Rows come from ard_sql.udfs.function_catalog().
CREATE OR REPLACE TABLE ard_functions (
    name VARCHAR NOT NULL,
    signature VARCHAR NOT NULL,
    available_in VARCHAR NOT NULL,
    description VARCHAR
);
