-- Engagement-label consistency over time: per time window and current label, the clicks and the
-- clicks expected at the positions shown (position curve of the whole log). COEC per label per window.
SELECT c.window_start, l.grade, any_value(l.label) AS label,
       sum(c.impressions) AS impressions, sum(c.clicks) AS clicks,
       sum(c.impressions * coalesce(k.reference_ctr, 0)) AS expected_clicks,
       sum(c.clicks) / nullif(sum(c.impressions * coalesce(k.reference_ctr, 0)), 0) AS coec,
       bool_or(c.simulated) AS simulated
FROM audit_counts c
JOIN (SELECT pair_id, label, grade FROM current_labels WHERE scheme = $scheme) l USING (pair_id)
LEFT JOIN audit_position_curve k USING (position)
GROUP BY ALL
ORDER BY c.window_start, l.grade
