-- cone(ra, dec, ra0, dec0, radius_deg): TRUE when (ra, dec) lies within radius_deg degrees
-- (great circle, haversine) of (ra0, dec0). All angles in degrees. Pure SQL: works in any
-- DuckDB client. Exact, but reads every partition; to read only the partitions that overlap
-- the cone use the table macro cone_search(ra0, dec0, radius_deg), or
-- db.query("cone(ra0, dec0, radius_deg) & ...") from Python.
-- Example: SELECT TargetID FROM ard WHERE cone(RA, DEC, 150.0, 2.2, 1.0);
CREATE OR REPLACE MACRO cone(ra, dec, ra0, dec0, radius_deg) AS
    2 * asin(sqrt(least(1.0,
        pow(sin(radians(dec - dec0) / 2), 2)
        + cos(radians(dec)) * cos(radians(dec0)) * pow(sin(radians(ra - ra0) / 2), 2))))
    <= radians(radius_deg);
