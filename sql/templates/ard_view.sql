-- The Swiss Army table: one row per target of the core table, every column of
-- the column contract (ard_sql.contract.all_columns()). Each layer joins on
-- TargetID; a layer that has not run yet gives typed NULL columns. When the build's
-- compacted table is current the view reads it instead (source = wide, no joins).
-- Placeholders (Python str.format): columns, source (core or wide), joins (one LEFT JOIN per layer view).
CREATE OR REPLACE VIEW ard AS
SELECT {columns}
FROM {source}
{joins};
