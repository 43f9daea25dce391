-- cone_search(ra0, dec0, radius_deg): the rows of `ard` (every column) within radius_deg
-- degrees of (ra0, dec0), reading only the HATS partitions that overlap the cone.
--
-- How it prunes: region_files(layer, region) is a Python UDF (registered by ard_sql.open())
-- that lists, with healpy query_disc(inclusive=True), the partition files of one staging
-- table that may overlap the region. Its arguments are constants, so DuckDB evaluates it
-- once while binding read_parquet(...): the other files are never opened. The exact test is
-- the pure-SQL `cone` macro (haversine), so the answer does not depend on the pruning.
--
-- A TEMP macro, created on each connection by ard_sql.open() (template: {scans} is core
-- LEFT JOIN every layer, each a typed read_parquet over region_files(...)).
-- Needs Python; in a plain DuckDB client use `WHERE cone(RA, DEC, ra0, dec0, radius_deg)`.
-- Example: SELECT count(*) FROM cone_search(150.0, 2.2, 1.0) WHERE LogMass_p50 > 10;
CREATE OR REPLACE TEMP MACRO cone_search(ra0, dec0, radius_deg) AS TABLE
    SELECT {columns}
    FROM {scans}
    WHERE cone(RA, DEC, ra0, dec0, radius_deg);
