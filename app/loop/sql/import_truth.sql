-- Ground truth: each pair's newest imported label (human judgments, or the generated catalog's
-- labels by construction), never the LLM's. The simulated log is drawn from it, so the audit can
-- catch LLM errors, and the held-out test set is graded by it, so relabels never move the test set.
SELECT l.pair_id, p.query_id, q.text AS query_text, p.product_id, p.dataset,
       arg_max(l.label, l.created_at) AS label, arg_max(l.grade, l.created_at) AS grade
FROM labels l JOIN pairs p USING (pair_id) JOIN queries q USING (query_id)
WHERE l.source = 'import' AND l.scheme = $scheme AND p.dataset = $dataset
GROUP BY l.pair_id, p.query_id, q.text, p.product_id, p.dataset
