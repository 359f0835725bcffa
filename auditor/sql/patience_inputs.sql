-- What the query-patience fit reads (auditor.model.fit_query_patience): per pair with expected clicks, its
-- query (an index 0..n_queries-1, -1 where unknown), counts, current label's grade, and the expected clicks at
-- each exponent of the examination curve (in the order of PATIENCE_EXPONENTS).
SELECT c.pair_id,
       CASE WHEN p.query_id IS NULL THEN -1 ELSE dense_rank() OVER (ORDER BY p.query_id NULLS LAST) - 1 END AS query_index,
       c.evidence_clicks, c.clicks, c.add_to_carts, c.purchases, l.grade,
       c.expected_clicks_patience_1, c.expected_clicks_patience_2, c.expected_clicks_patience_3,
       c.expected_clicks, c.expected_clicks_patience_4, c.expected_clicks_patience_5, c.expected_clicks_patience_6
FROM audit_counts c
LEFT JOIN audit_labels l USING (pair_id)
LEFT JOIN pairs p USING (pair_id)
WHERE c.expected_clicks > 0
ORDER BY c.pair_id
