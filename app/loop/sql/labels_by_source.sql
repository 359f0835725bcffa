-- Labels written and pairs labelled, per label source, in the whole store.
SELECT source, count(*) AS labels, count(DISTINCT pair_id) AS pairs FROM labels GROUP BY source ORDER BY source
