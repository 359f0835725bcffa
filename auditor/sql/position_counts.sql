-- Per pair and position over all windows: the input of the position-curve estimate. Pairs get a
-- dense integer key so the fit's repeated joins hash integers, not strings.
CREATE OR REPLACE TEMP TABLE audit_pair_position AS
SELECT dense_rank() OVER (ORDER BY pair_id) AS pair_key, position,
       sum(impressions) AS impressions, sum(clicks) AS clicks
FROM audit_counts
WHERE position <= $max_position
GROUP BY pair_id, position
