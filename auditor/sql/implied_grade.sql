-- The engagement-implied grade of each pair and its confidence: the log-likelihood of the pair's
-- clicks (Poisson around expected_clicks * the grade's COEC), add-to-carts given clicks and
-- purchases given add-to-carts (binomial) under each grade's profile, divided by a dispersion
-- factor (pairs vary more than Poisson), turned into a posterior over grades with a flat prior.
-- label_posterior: the posterior of the pair's current label; log_likelihood_ratio: best grade vs label.
WITH likelihood AS (
    SELECT m.pair_id, m.grade AS label_grade, g.grade AS candidate_grade,
           (  m.clicks * ln(greatest(m.expected_clicks * g.coec, 1e-9)) - m.expected_clicks * g.coec
            + m.add_to_carts * ln(g.add_to_cart_rate) + (m.clicks - m.add_to_carts) * ln(1 - g.add_to_cart_rate)
            + m.purchases * ln(g.purchase_rate) + (m.add_to_carts - m.purchases) * ln(1 - g.purchase_rate)
           ) / $dispersion AS loglik
    FROM audit_pair_metrics m, audit_grade_profile g
    WHERE m.expected_clicks > 0
),
shifted AS (
    SELECT *, exp(loglik - max(loglik) OVER (PARTITION BY pair_id)) AS weight FROM likelihood
),
posterior AS (
    SELECT *, weight / sum(weight) OVER (PARTITION BY pair_id) AS probability FROM shifted
)
SELECT pair_id,
       arg_max(candidate_grade, probability) AS implied_grade,
       max(probability) AS implied_confidence,
       sum(candidate_grade * probability) AS expected_grade,
       max(probability) FILTER (WHERE candidate_grade = label_grade) AS label_posterior,
       max(loglik) - max(loglik) FILTER (WHERE candidate_grade = label_grade) AS log_likelihood_ratio,
       to_json(map_from_entries(list(struct_pack(k := CAST(candidate_grade AS VARCHAR), v := round(probability, 4))
                                     ORDER BY candidate_grade))) AS grade_posterior
FROM posterior
GROUP BY pair_id
