-- similar_to(target_id, k, embedding := 'astro', allowed := NULL): the k nearest neighbours of a
-- target's own embedding (the target itself left out), as (TargetID BIGINT, distance FLOAT).
-- Same arguments and filtered form as "similar"; no rows when the target has no embedding.
-- Pure SQL brute force (works in the DuckDB shell); ard_sql.open() shadows it with the
-- HNSW-index TEMP macro of the same name (sql/similar_index/similar_to.sql).
-- Example: SELECT * FROM similar_to(39627640566170902, 50, 'shen');
CREATE OR REPLACE MACRO similar_to(target_id, k, embedding := 'astro', allowed := NULL) AS TABLE
SELECT TargetID, distance
FROM "similar"(
    (SELECT CASE WHEN lower(embedding) IN ('shen', 'emb_shen') THEN emb_shen ELSE emb_astro END
     FROM embed WHERE TargetID = target_id LIMIT 1),
    -- checked here: an empty inner result would never evaluate the outer LIMIT's error
    CASE WHEN k < 0 THEN error('similar_to: k must be >= 0, got ' || k) ELSE k + 1 END, embedding, allowed)
WHERE TargetID <> target_id
ORDER BY distance, TargetID
-- not coalesce(k, 0) alone: a constant negative k would then fail at bind time, even with no candidate
LIMIT (CASE WHEN k < 0 THEN error('similar_to: k must be >= 0, got ' || k) ELSE coalesce(k, 0) END);
