-- TEMP similar_to(target_id, k, embedding := 'astro', allowed := NULL) backed by the USearch HNSW
-- index; shadows the persistent brute-force macro (sql/macros/similar_to.sql). The target's vector is
-- read from the index; the target itself is left out of its neighbours.
CREATE OR REPLACE TEMP MACRO similar_to(target_id, k, embedding := 'astro', allowed := NULL) AS TABLE
SELECT unnest(ard_similar_to(target_id, k, embedding, allowed), recursive := true);
