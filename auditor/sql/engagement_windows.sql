-- Engagement-label consistency over time: per time window and current label, the evidence clicks and
-- the clicks expected at the positions shown (the fitted reference CTR), and their ratio, COEC; clicks where the
-- curve gives no reference (past max_position) are left out, as in event_counts.sql. Read
-- from the sampled pairs of pass 1 (sample_cells.sql): every pair of a log up to sample_events events.
SELECT c.window_start, l.grade, any_value(l.label) AS label,
       sum(c.impressions) AS impressions,
       sum(c.clicks) FILTER (WHERE (NOT c.after_click OR $after_click_evidence)
                            AND reference_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(c.position, c.after_click)) > 0) AS clicks,
       sum(c.impressions * reference_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(c.position, c.after_click))) AS expected_clicks,
       sum(c.clicks) FILTER (WHERE (NOT c.after_click OR $after_click_evidence)
                            AND reference_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(c.position, c.after_click)) > 0)
           / nullif(sum(c.impressions * reference_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(c.position, c.after_click))), 0) AS coec,
       bool_or(c.simulated) AS simulated
FROM audit_sample_cells c
JOIN audit_labels l USING (pair_id)
GROUP BY ALL
ORDER BY c.window_start, l.grade
