-- Per pair: engagement counts, COEC (clicks over the clicks expected at the positions shown),
-- rates with Wilson intervals and a Poisson score interval for COEC, joined with the current label.
WITH per_pair AS (
    SELECT c.pair_id,
           sum(c.impressions) AS impressions,
           sum(c.clicks) AS clicks,
           sum(c.add_to_carts) AS add_to_carts,
           sum(c.purchases) AS purchases,
           sum(c.impressions * coalesce(k.reference_ctr, 0)) AS expected_clicks,
           bool_or(c.simulated) AS simulated
    FROM audit_pair_position c LEFT JOIN audit_position_curve k USING (position)
    GROUP BY c.pair_id
)
SELECT p.*,
       l.label, l.grade, l.source AS label_source, l.confidence AS label_confidence,
       p.clicks / nullif(p.expected_clicks, 0) AS coec,
       poisson_low(p.clicks, p.expected_clicks, $z) AS coec_low,
       poisson_high(p.clicks, p.expected_clicks, $z) AS coec_high,
       p.clicks / nullif(p.impressions, 0) AS ctr,
       wilson_low(p.clicks, p.impressions, $z) AS ctr_low,
       wilson_high(p.clicks, p.impressions, $z) AS ctr_high,
       p.add_to_carts / nullif(p.clicks, 0) AS add_to_cart_rate,
       wilson_low(p.add_to_carts, p.clicks, $z) AS add_to_cart_low,
       wilson_high(p.add_to_carts, p.clicks, $z) AS add_to_cart_high,
       p.purchases / nullif(p.clicks, 0) AS purchase_rate,
       wilson_low(p.purchases, p.clicks, $z) AS purchase_low,
       wilson_high(p.purchases, p.clicks, $z) AS purchase_high
FROM per_pair p
LEFT JOIN (SELECT pair_id, label, grade, source, confidence FROM current_labels WHERE scheme = $scheme) l USING (pair_id)
