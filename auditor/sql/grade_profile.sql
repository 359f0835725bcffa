-- What engagement looks like for each label, estimated from the log itself. COEC: the pooled
-- clicks / expected clicks of the label's well-observed pairs whose COEC lies between the label's
-- 10th and 90th percentiles (trimming keeps the minority of wrong labels out). Conversion:
-- pooled add-to-cart-per-click and purchase-per-add-to-cart, smoothed towards the overall rate.
WITH observed AS (
    SELECT * FROM audit_pair_metrics
    WHERE grade IS NOT NULL AND expected_clicks >= $min_expected_clicks
),
bounds AS (
    SELECT grade, quantile_cont(coec, 0.1) AS low, quantile_cont(coec, 0.9) AS high, count(*) AS pairs
    FROM observed GROUP BY grade
),
overall AS (
    SELECT sum(add_to_carts) / greatest(sum(clicks), 1) AS atc, sum(purchases) / greatest(sum(add_to_carts), 1) AS buy
    FROM observed
)
SELECT o.grade, any_value(o.label) AS label, any_value(b.pairs) AS pairs,
       greatest(sum(o.clicks) / sum(o.expected_clicks), 1e-3) AS coec,
       (sum(o.add_to_carts) + 10 * any_value(v.atc)) / (sum(o.clicks) + 10) AS add_to_cart_rate,
       (sum(o.purchases) + 10 * any_value(v.buy)) / (sum(o.add_to_carts) + 10) AS purchase_rate
FROM observed o JOIN bounds b USING (grade), overall v
WHERE o.coec BETWEEN b.low AND b.high
GROUP BY o.grade
HAVING any_value(b.pairs) >= $min_pairs_per_grade
ORDER BY o.grade
