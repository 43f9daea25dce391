-- region_search(region): the rows of `ard` (every column) inside a sky region, reading only
-- the HATS partitions that overlap it. `region` is a string:
--   'CIRCLE ra dec radius'                        (degrees)
--   'POLYGON ra1 dec1 ra2 dec2 ra3 dec3 ...'      (convex, great-circle edges, degrees)
--   'MOC 5/12-15 6/100'                           (IVOA MOC ASCII, read with mocpy)
--
-- Pruning as in cone_search: region_files(layer, region) (Python UDF, evaluated once at bind
-- time) lists the partition files that may overlap the region (healpy query_disc /
-- query_polygon with inclusive=True, MOC ranges). The exact test is in_region(RA, DEC, region)
-- (Python UDF, vectorised; a MOC is tested at the point's order-29 HEALPix pixel).
--
-- A TEMP macro, created on each connection by ard_sql.open() (template: see cone_search.sql).
-- Example: SELECT count(*) FROM region_search('POLYGON 149 1 151 1 151 3 149 3');
CREATE OR REPLACE TEMP MACRO region_search(region) AS TABLE
    SELECT {columns}
    FROM {scans}
    WHERE in_region(RA, DEC, region);
