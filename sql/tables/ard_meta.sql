-- Provenance of an ARD: versions, source, build date and options, layer
-- versions, and the unit and description of every column of the `ard` view.
-- section: 'build' | 'version' | 'layer' | 'column'; for 'column' rows, name
-- is the column, value its DuckDB type and layer the staging table it comes from.
CREATE OR REPLACE TABLE ard_meta (
    section VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    value VARCHAR,
    unit VARCHAR,
    description VARCHAR,
    layer VARCHAR
);
