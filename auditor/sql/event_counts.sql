-- Pass 2 over the raw events (with their click context): counts per pair, and the clicks an average
-- pair would get at the positions shown (expected_clicks: one reference CTR per impression, from the
-- fitted curve, see the reference_ctr macro). Under a sequential click model the impressions below a
-- session's first click are not evidence: their reference CTR is 0, and their clicks are left out of
-- evidence_clicks. Every later per-pair step reads this (much smaller) table.
SELECT pair_id,
       count(*) FILTER (WHERE event_type = 'impression') AS impressions,
       count(*) FILTER (WHERE event_type = 'click') AS clicks,
       -- clicks where the curve gives no reference (past max_position) are not evidence: no clicks are expected there
       count(*) FILTER (WHERE event_type = 'click' AND (NOT after_click OR $after_click_evidence)
                        AND reference_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(position, after_click)) > 0) AS evidence_clicks,
       -- the grade model reads add-to-carts given clicks and purchases given add-to-carts: a log's extra ones (a
       -- purchase logged without its add-to-cart, or from a session where the product was not shown) are capped
       least(count(*) FILTER (WHERE event_type = 'add_to_cart'), count(*) FILTER (WHERE event_type = 'click')) AS add_to_carts,
       least(count(*) FILTER (WHERE event_type = 'purchase'), count(*) FILTER (WHERE event_type = 'add_to_cart'),
             count(*) FILTER (WHERE event_type = 'click')) AS purchases,
       coalesce(sum(reference_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(position, after_click)))
                FILTER (WHERE event_type = 'impression'), 0) AS expected_clicks,
       -- the same with the curve's examination raised to each exponent of $patience_grid (a query whose
       -- shoppers look deeper than average, exponent < 1, or less deep, > 1; auditor.model.fit_query_patience)
       coalesce(sum(patient_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(position, after_click), $curve_attractiveness, $patience_grid[1]))
                FILTER (WHERE event_type = 'impression'), 0) AS expected_clicks_patience_1,
       coalesce(sum(patient_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(position, after_click), $curve_attractiveness, $patience_grid[2]))
                FILTER (WHERE event_type = 'impression'), 0) AS expected_clicks_patience_2,
       coalesce(sum(patient_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(position, after_click), $curve_attractiveness, $patience_grid[3]))
                FILTER (WHERE event_type = 'impression'), 0) AS expected_clicks_patience_3,
       coalesce(sum(patient_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(position, after_click), $curve_attractiveness, $patience_grid[4]))
                FILTER (WHERE event_type = 'impression'), 0) AS expected_clicks_patience_4,
       coalesce(sum(patient_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(position, after_click), $curve_attractiveness, $patience_grid[5]))
                FILTER (WHERE event_type = 'impression'), 0) AS expected_clicks_patience_5,
       coalesce(sum(patient_ctr(CAST($reference_ctr AS DOUBLE[]), curve_key(position, after_click), $curve_attractiveness, $patience_grid[6]))
                FILTER (WHERE event_type = 'impression'), 0) AS expected_clicks_patience_6,
       bool_or(simulated) AS simulated
FROM audit_context_events
-- add-to-carts and purchases logged without a position still count for their pair
WHERE pair_id IS NOT NULL AND (position IS NOT NULL OR event_type IN ('add_to_cart', 'purchase'))
GROUP BY pair_id
