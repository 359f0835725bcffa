-- Per pair (audit_counts, from event_counts.sql): engagement counts, COEC (evidence clicks over the
-- clicks expected at the positions shown), rates with Wilson intervals and a Poisson score interval for
-- COEC, joined with the current label (audit_labels.sql).
SELECT p.*,
       l.label, l.grade, l.source AS label_source, l.confidence AS label_confidence,
       p.evidence_clicks / nullif(p.expected_clicks, 0) AS coec,
       poisson_low(p.evidence_clicks, p.expected_clicks, $z) AS coec_low,
       poisson_high(p.evidence_clicks, p.expected_clicks, $z) AS coec_high,
       p.clicks / nullif(p.impressions, 0) AS ctr,
       wilson_low(p.clicks, p.impressions, $z) AS ctr_low,
       wilson_high(p.clicks, p.impressions, $z) AS ctr_high,
       p.add_to_carts / nullif(p.clicks, 0) AS add_to_cart_rate,
       wilson_low(p.add_to_carts, p.clicks, $z) AS add_to_cart_low,
       wilson_high(p.add_to_carts, p.clicks, $z) AS add_to_cart_high,
       p.purchases / nullif(p.clicks, 0) AS purchase_rate,
       wilson_low(p.purchases, p.clicks, $z) AS purchase_low,
       wilson_high(p.purchases, p.clicks, $z) AS purchase_high
FROM audit_counts p
LEFT JOIN audit_labels l USING (pair_id)
