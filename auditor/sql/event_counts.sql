-- Pass 2 over the raw events: counts per pair and time window, and the clicks an average pair would
-- get at the positions shown (expected_clicks: one reference CTR per impression, from the fitted
-- position curve; $reference_ctr[k] is the CTR at position k; positions past the curve add nothing). Every later step
-- reads this (much smaller) table.
SELECT pair_id,
       time_bucket(to_days(CAST($window_days AS INTEGER)), ts, CAST($origin AS TIMESTAMP)) AS window_start,
       count(*) FILTER (WHERE event_type = 'impression') AS impressions,
       count(*) FILTER (WHERE event_type = 'click') AS clicks,
       count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_carts,
       count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
       coalesce(sum(CASE WHEN position >= 1 THEN list_extract(CAST($reference_ctr AS DOUBLE[]), position) END)
                FILTER (WHERE event_type = 'impression'), 0) AS expected_clicks,
       bool_or(simulated) AS simulated
FROM audit_events
WHERE pair_id IS NOT NULL AND position IS NOT NULL
GROUP BY ALL
