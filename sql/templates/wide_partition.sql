-- One partition of the compacted Swiss Army table (build/compaction.py): the partition's
-- core file LEFT JOIN each layer's file of the same partition on TargetID, every contract
-- column (typed NULLs for a layer that has not written this partition), core row order.
-- Placeholders (Python str.format): columns, core (an SQL string literal), joins.
SELECT {columns}
FROM read_parquet({core}) AS core
{joins}
ORDER BY core."_healpix_29", core.TargetID;
