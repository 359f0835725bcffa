-- Per pair and position over all windows: the input of the position-curve estimate.
CREATE OR REPLACE TEMP TABLE audit_pair_position AS
SELECT pair_id, position, sum(impressions) AS impressions, sum(clicks) AS clicks
FROM audit_counts
WHERE position <= $max_position
GROUP BY ALL
