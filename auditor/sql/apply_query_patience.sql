-- audit_counts with each pair's expected clicks under its query's fitted patience (audit_patience: pair_id,
-- expected_clicks, query_patience, from auditor.model.fit_query_patience; pairs not in it keep theirs), the
-- per-exponent sums left out.
SELECT c.* EXCLUDE (expected_clicks, expected_clicks_patience_1, expected_clicks_patience_2, expected_clicks_patience_3,
                    expected_clicks_patience_4, expected_clicks_patience_5, expected_clicks_patience_6),
       coalesce(a.expected_clicks, c.expected_clicks) AS expected_clicks,
       coalesce(a.query_patience, 1.0) AS query_patience
FROM audit_counts c
LEFT JOIN audit_patience a USING (pair_id)
