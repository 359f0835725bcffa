-- The newest retriever scores (mining_candidates of the newest run that scored pairs) with the
-- current label (audit_labels.sql), and each score's percentile among all scored pairs.
WITH newest_run AS (
    SELECT run_id FROM mining_candidates WHERE score IS NOT NULL
    GROUP BY run_id ORDER BY max(created_at) DESC LIMIT 1
)
SELECT m.pair_id, m.model_id, m.score, percent_rank() OVER (ORDER BY m.score) AS score_percentile,
       l.label, l.grade
FROM mining_candidates m
JOIN newest_run USING (run_id)
JOIN audit_labels l USING (pair_id)
