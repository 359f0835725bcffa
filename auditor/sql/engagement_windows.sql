-- Engagement-label consistency over time: per time window and current label, the clicks and the
-- clicks expected at the positions shown (the fitted reference CTR), and their ratio, COEC. Read from
-- the sampled pairs of pass 1 (sample_cells.sql): every pair of a log up to sample_events events.
SELECT c.window_start, l.grade, any_value(l.label) AS label,
       sum(c.impressions) AS impressions, sum(c.clicks) AS clicks,
       sum(c.impressions * reference_ctr(CAST($reference_ctr AS DOUBLE[]), c.position)) AS expected_clicks,
       sum(c.clicks) / nullif(sum(c.impressions * reference_ctr(CAST($reference_ctr AS DOUBLE[]), c.position)), 0) AS coec,
       bool_or(c.simulated) AS simulated
FROM audit_sample_cells c
JOIN audit_labels l USING (pair_id)
GROUP BY ALL
ORDER BY c.window_start, l.grade
