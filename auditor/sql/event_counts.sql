-- One pass over the raw events (the audit_events view: the store table or a Parquet folder):
-- counts per pair, position and time window. Everything after this reads the (much smaller) result.
SELECT pair_id,
       position,
       time_bucket(to_days(CAST($window_days AS INTEGER)), ts, CAST($origin AS TIMESTAMP)) AS window_start,
       count(*) FILTER (WHERE event_type = 'impression') AS impressions,
       count(*) FILTER (WHERE event_type = 'click') AS clicks,
       count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_carts,
       count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
       bool_or(simulated) AS simulated
FROM audit_events
WHERE pair_id IS NOT NULL AND position IS NOT NULL
GROUP BY ALL
