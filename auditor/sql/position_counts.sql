-- Per pair and position over all windows (a small table: at most pairs x positions shown): the input
-- of the position-curve fit and of the per-pair metrics. pair_hash is an integer key for numpy.
CREATE OR REPLACE TEMP TABLE audit_pair_position AS
SELECT pair_id, hash(pair_id) AS pair_hash, position,
       sum(impressions) AS impressions, sum(clicks) AS clicks,
       sum(add_to_carts) AS add_to_carts, sum(purchases) AS purchases, bool_or(simulated) AS simulated
FROM audit_counts
GROUP BY pair_id, position
