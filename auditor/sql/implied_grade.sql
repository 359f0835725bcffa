-- The engagement-implied grade of each pair and its confidence: the log-likelihood of the pair's
-- clicks (Poisson around expected_clicks * the grade's COEC), add-to-carts given clicks and
-- purchases given add-to-carts (binomial) under each grade's profile, divided by a dispersion
-- factor (pairs vary more than Poisson), turned into a posterior over grades with a flat prior.
-- label_posterior: the posterior of the pair's current label; log_likelihood_ratio: best grade vs label.
-- One row per pair; posterior_grades / grade_posterior: the candidate grades and their posterior
-- probabilities, as lists in grade order (no window functions or JSON: this runs over every pair).
WITH likelihood AS (
    SELECT m.pair_id, m.grade AS label_grade, g.grade AS candidate_grade,
           (  m.clicks * ln(greatest(m.expected_clicks * g.coec, 1e-9)) - m.expected_clicks * g.coec
            + m.add_to_carts * ln(g.add_to_cart_rate) + (m.clicks - m.add_to_carts) * ln(1 - g.add_to_cart_rate)
            + m.purchases * ln(g.purchase_rate) + (m.add_to_carts - m.purchases) * ln(1 - g.purchase_rate)
           ) / $dispersion AS loglik
    FROM audit_pair_metrics m, audit_grade_profile g
    WHERE m.expected_clicks > 0
),
per_pair AS (
    SELECT pair_id, any_value(label_grade) AS label_grade,
           list(candidate_grade ORDER BY candidate_grade) AS grades,
           list(loglik ORDER BY candidate_grade) AS logliks
    FROM likelihood GROUP BY pair_id
),
weighted AS (
    SELECT *, list_transform(logliks, lambda x: exp(x - list_max(logliks))) AS weights FROM per_pair
),
posterior AS (
    SELECT *, list_transform(weights, lambda w: w / list_sum(weights)) AS probs FROM weighted
)
SELECT pair_id,
       grades[list_position(probs, list_max(probs))] AS implied_grade,
       list_max(probs) AS implied_confidence,
       list_dot_product(list_transform(grades, lambda g: CAST(g AS DOUBLE)), probs) AS expected_grade,
       probs[list_position(grades, label_grade)] AS label_posterior,
       list_max(logliks) - logliks[list_position(grades, label_grade)] AS log_likelihood_ratio,
       grades AS posterior_grades,
       probs AS grade_posterior
FROM posterior
