-- Products flagged by a current label of any of their pairs, in any scheme: a flag is about the
-- product, not the query. Flagged: the human decision when one was made, else probability >= $threshold.
-- Parameters: $threshold, $dataset (NULL: every dataset).
SELECT p.product_id, string_agg(DISTINCT f.flag, ',' ORDER BY f.flag) AS flags,
       count(DISTINCT f.pair_id) AS n_pairs
FROM current_flags f
JOIN pairs p ON p.pair_id = f.pair_id
WHERE coalesce(f.decision, f.probability >= $threshold)
  AND ($dataset::VARCHAR IS NULL OR p.dataset = $dataset)
GROUP BY p.product_id
ORDER BY p.product_id;
