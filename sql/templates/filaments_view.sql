-- filaments: the persistence-filtered filament skeleton of the topology layer, one row per
-- segment: (x0, y0, z0) -> (x1, y1, z1) in comoving Mpc (observer at the origin, ICRS axes,
-- the cosmology in ard_meta) and the significance of the persistence pair that keeps it.
-- Created only once the topology layer has run. Placeholders: ard_dir (an SQL string literal).
CREATE OR REPLACE VIEW filaments AS
SELECT *
FROM read_parquet(coalesce(getvariable('ard_dir'), {ard_dir}) || '/artifacts/topology/filaments.parquet');
