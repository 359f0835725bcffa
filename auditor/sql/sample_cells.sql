-- Pass 1 over the raw events (audit_context_events: the events with their click context): counts per
-- (pair, position, click context, time window) for the pairs of a hash sample, one pair in
-- $sample_modulus (every pair when it is 1). The position-curve fit and the engagement-drift windows
-- read it; both are aggregates that a sample of whole pairs estimates as well as the full log.
SELECT pair_id,
       position,
       after_click,
       time_bucket(to_days(CAST($window_days AS INTEGER)), ts, CAST($origin AS TIMESTAMP)) AS window_start,
       count(*) FILTER (WHERE event_type = 'impression') AS impressions,
       count(*) FILTER (WHERE event_type = 'click') AS clicks,
       bool_or(simulated) AS simulated
FROM audit_context_events
WHERE pair_id IS NOT NULL AND position IS NOT NULL
  AND hash(pair_id) % CAST($sample_modulus AS UBIGINT) = 0
GROUP BY ALL
