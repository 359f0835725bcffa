-- The position CTR curve estimated from the log: observed CTR, the fitted examination
-- probability (1 at position 1), and the reference CTR an average pair gets at each position:
-- examination * the impression-weighted mean attractiveness, so expected clicks sum to clicks.
WITH observed AS (
    SELECT position, sum(impressions) AS impressions, sum(clicks) AS clicks
    FROM audit_pair_position GROUP BY position
),
mean_attractiveness AS (
    SELECT sum(pp.clicks) / greatest(sum(pp.impressions * e.examination), 1e-9) AS value
    FROM audit_pair_position pp JOIN audit_examination e USING (position)
)
SELECT o.position, o.impressions, o.clicks, o.clicks / greatest(o.impressions, 1) AS observed_ctr,
       e.examination, e.examination * m.value AS reference_ctr
FROM observed o JOIN audit_examination e USING (position), mean_attractiveness m
ORDER BY o.position
