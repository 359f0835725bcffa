-- Pass 1 over the raw events (the audit_events view: the store table or a Parquet folder): the input
-- of the position-curve fit. Counts per (pair, position) for the pairs of a hash sample (one pair in
-- $sample_modulus); every other pair's events fold into one row per position with pair_id NULL, so
-- the per-position totals stay exact while the fit reads a bounded number of cells.
SELECT CASE WHEN hash(pair_id) % CAST($sample_modulus AS UBIGINT) = 0 THEN pair_id END AS pair_id,
       position,
       count(*) FILTER (WHERE event_type = 'impression') AS impressions,
       count(*) FILTER (WHERE event_type = 'click') AS clicks
FROM audit_events
WHERE pair_id IS NOT NULL AND position IS NOT NULL
GROUP BY ALL
