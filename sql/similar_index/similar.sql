-- TEMP "similar"(vector, k, embedding := 'astro', allowed := NULL) backed by the USearch HNSW
-- index (created by ard_sql.udfs.similar on each connection of ard_sql.open(), when the index
-- files exist). Shadows the persistent brute-force macro of the same name and signature
-- (sql/macros/similar.sql); the UDF ard_similar returns LIST(STRUCT(TargetID, distance)).
CREATE OR REPLACE TEMP MACRO "similar"(vector, k, embedding := 'astro', allowed := NULL) AS TABLE
SELECT unnest(ard_similar(vector::FLOAT[], k, embedding, allowed), recursive := true);
