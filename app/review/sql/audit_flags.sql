-- The flags of one audit run with what the annotator needs to recognise the pair, strongest first.
-- Parameters: $run_id.
SELECT f.flag_id, f.pair_id, f.kind, f.reason, f.score, f.evidence, p.dataset,
       q.text AS query, pr.title, c.scheme, c.label AS current_label, c.source AS current_source
FROM audit_flags f
LEFT JOIN pairs p ON p.pair_id = f.pair_id
LEFT JOIN queries q ON q.query_id = p.query_id
LEFT JOIN products pr ON pr.product_id = p.product_id
LEFT JOIN current_labels c ON c.pair_id = f.pair_id
WHERE f.run_id = $run_id
ORDER BY f.score DESC NULLS LAST, f.flag_id;
