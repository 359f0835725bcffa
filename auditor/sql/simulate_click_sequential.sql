-- Cascade and dynamic Bayesian network models: the shopper scans top-down. After examining a
-- product they click it with probability `attractiveness`; a click satisfies them with probability
-- `satisfaction` (1 in the cascade model) and they stop; otherwise they go on with probability
-- $continue_prob ^ (1 / patience) (1 in the cascade model; patience is the query's, 1 by default).
-- Stopping is drawn once per impression, so a session's
-- examined prefix is "no stop before this position".
-- examination: P(the shopper reaches this position) = prod over earlier positions of
-- continue_prob^(1 / patience) * (1 - attractiveness * satisfaction).
clicks AS (
    SELECT *,
           exp(coalesce(sum(ln($continue_prob) / patience + ln(1 - attractiveness * sat)) OVER before, 0)) AS examination,
           coalesce(NOT bool_or(stops) OVER before, true) AND u_click < attractiveness AS clicked
    FROM (
        SELECT *,
               (u_click < attractiveness AND u01(hash($seed, 'satisfied', session_hash, pair_id)) < sat)
               OR u01(hash($seed, 'continue', session_hash, pair_id)) >= pow($continue_prob, 1 / patience) AS stops
        FROM (SELECT *, CASE WHEN $cascade THEN 1.0 ELSE satisfaction END AS sat FROM shown)
    )
    WINDOW before AS (PARTITION BY session_hash ORDER BY position ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
),
