-- "similar"(vector, k, embedding := 'astro', allowed := NULL): the k nearest neighbours of a
-- vector by cosine distance, as a table (TargetID BIGINT, distance FLOAT), nearest first.
-- embedding: 'astro' (emb_astro) or 'shen' (emb_shen). allowed: optional list of TargetIDs the
-- neighbours must come from (filtered search), e.g.
--   (SELECT coalesce(list(TargetID), []) FROM ard WHERE Z < 0.2 AND Web_Class = 'Void'): coalesce, since
--   list() over no row is NULL, which means no filter.
-- Pure SQL, exact (brute force array_cosine_distance over the embed view): works in the DuckDB
-- shell. ard_sql.open() shadows it with a TEMP macro of the same name backed by the HNSW index
-- (sql/similar_index/similar.sql). `similar` is a keyword: quoted here; calls need no quotes.
-- Example: SELECT * FROM similar((SELECT emb_astro FROM ard LIMIT 1), 10);
CREATE OR REPLACE MACRO "similar"(vector, k, embedding := 'astro', allowed := NULL) AS TABLE
SELECT TargetID, distance::FLOAT AS distance
FROM (
    SELECT TargetID,
           array_cosine_distance(
               CASE lower(embedding)
                   WHEN 'astro' THEN emb_astro WHEN 'emb_astro' THEN emb_astro
                   WHEN 'shen' THEN emb_shen WHEN 'emb_shen' THEN emb_shen
                   ELSE error('similar: unknown embedding ' || embedding || ' (use astro or shen)')
               END,
               vector::FLOAT[768]) AS distance
    FROM embed
    WHERE allowed IS NULL OR TargetID IN (SELECT unnest(allowed))
)
WHERE distance IS NOT NULL AND NOT isnan(distance)
ORDER BY distance, TargetID
-- a NULL k gives no rows, a negative one an error (as the index-backed macro does); a NULL vector
-- gives no rows whatever k
LIMIT (CASE WHEN k < 0 THEN error('similar: k must be >= 0, got ' || k) ELSE coalesce(k, 0) END);
