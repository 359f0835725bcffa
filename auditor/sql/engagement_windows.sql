-- Engagement-label consistency over time: per time window and current label, the clicks and the
-- clicks expected at the positions shown (position curve of the whole log, see event_counts.sql).
-- COEC per label per window.
SELECT c.window_start, l.grade, any_value(l.label) AS label,
       sum(c.impressions) AS impressions, sum(c.clicks) AS clicks,
       sum(c.expected_clicks) AS expected_clicks,
       sum(c.clicks) / nullif(sum(c.expected_clicks), 0) AS coec,
       bool_or(c.simulated) AS simulated
FROM audit_counts c
JOIN audit_labels l USING (pair_id)
GROUP BY ALL
ORDER BY c.window_start, l.grade
