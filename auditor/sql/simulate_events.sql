-- Simulated engagement log from true grades (see auditor/simulate.py for every parameter).
-- Inputs: sim_pairs(pair_id, query_id, query_text, product_id, dataset, grade) and
--         sim_grades(grade, attractiveness, drifted_attractiveness, add_to_cart_rate, purchase_rate).
-- One row per event; columns match the engagement_events table, plus true_examination.
WITH RECURSIVE queries AS (
    SELECT query_id, any_value(query_text) AS query_text, any_value(dataset) AS dataset,
           row_number() OVER (ORDER BY hash($seed, 'popularity', query_id)) AS popularity_rank
    FROM sim_pairs GROUP BY query_id
),
shares AS (
    SELECT *, pow(popularity_rank, -$zipf_exponent) / sum(pow(popularity_rank, -$zipf_exponent)) OVER () AS share
    FROM queries
),
query_sessions AS (
    SELECT *, CAST(floor($n_sessions * share + u01(hash($seed, 'remainder', query_id))) AS BIGINT) AS n_sessions
    FROM shares
),
sessions AS (
    SELECT query_id, query_text, dataset, unnest(range(n_sessions)) AS session_no FROM query_sessions
),
timed_sessions AS (
    SELECT *, hash($seed, 'session', query_id, session_no) AS session_hash,
           $start + to_microseconds(CAST(u01(hash($seed, 'time', query_id, session_no)) * $window_seconds * 1e6 AS BIGINT)) AS session_ts,
           -- pages viewed: 1 + Geometric(page_continue), at most max_pages
           CASE WHEN $page_continue > 0 THEN least($max_pages, 1 + CAST(floor(
               ln(greatest(u01(hash($seed, 'pages', query_id, session_no)), 1e-12)) / ln($page_continue)) AS INTEGER))
                ELSE 1 END AS pages,
           u01(hash($seed, 'explore', query_id, session_no)) < $explore_rate AS explore
    FROM sessions
),
ranked AS (
    SELECT s.session_hash, s.session_ts, s.query_text, s.dataset, p.query_id, p.product_id, p.pair_id, p.grade,
           row_number() OVER (
               PARTITION BY s.session_hash
               ORDER BY CASE WHEN s.explore THEN u01(hash($seed, 'shuffle', s.session_hash, p.pair_id))
                             -- a production ranker: one score per pair, a little jitter per session
                             WHEN $fixed_ranker THEN p.grade
                                  + $rank_noise * std_normal(hash($seed, 'fixed1', p.pair_id), hash($seed, 'fixed2', p.pair_id))
                                  + $ranker_jitter * std_normal(hash($seed, 'rank1', s.session_hash, p.pair_id),
                                                                hash($seed, 'rank2', s.session_hash, p.pair_id))
                             ELSE p.grade + $rank_noise * std_normal(hash($seed, 'rank1', s.session_hash, p.pair_id),
                                                                     hash($seed, 'rank2', s.session_hash, p.pair_id)) END DESC,
                        p.pair_id
           ) AS position, s.pages
    FROM timed_sessions s JOIN sim_pairs p USING (query_id)
),
shown AS MATERIALIZED (
    SELECT r.*, g.add_to_cart_rate, g.purchase_rate, g.satisfaction,
           u01(hash($seed, 'click', r.session_hash, r.pair_id)) AS u_click,
           -- shoppers of one query share a patience (1 unless $query_patience_spread > 0): the click model's
           -- examination decay is divided by it, its continue probability raised to 1 / patience
           exp($query_patience_spread * std_normal(hash($seed, 'patience1', r.query_id),
                                                   hash($seed, 'patience2', r.query_id))) AS patience,
           -- per pair appeal beyond its grade, and per query a click propensity shared by its products (1 unless
           -- $query_appeal_spread > 0: some queries' shoppers click more of what they see)
           1.0 / (1.0 + exp(-(ln(a / (1 - a)) + $pair_noise * std_normal(hash($seed, 'pair1', r.pair_id),
                                                                          hash($seed, 'pair2', r.pair_id))
                              + $query_appeal_spread * std_normal(hash($seed, 'qappeal1', r.query_id),
                                                                  hash($seed, 'qappeal2', r.query_id))))) AS attractiveness
    FROM ranked r JOIN sim_grades g USING (grade),
         LATERAL (SELECT CASE WHEN $drift_at IS NOT NULL AND r.session_ts >= $drift_at
                              THEN g.drifted_attractiveness ELSE g.attractiveness END AS a)
    WHERE r.position <= $page_size * r.pages
),
-- clicks(...): shown plus `examination` (the true probability that the shopper looked at the
-- impression) and `clicked`, by the click model's own file (simulate_click_<model>.sql).
/*CLICK_MODEL*/
outcomes AS (
    SELECT *,
           u01(hash($seed, 'cart', session_hash, pair_id)) < add_to_cart_rate AS carted,
           u01(hash($seed, 'buy', session_hash, pair_id)) < purchase_rate AS bought
    FROM clicks
),
counted AS (
    SELECT *, 1 + CAST(clicked AS INTEGER) + CAST(clicked AND carted AS INTEGER)
                + CAST(clicked AND carted AND bought AS INTEGER) AS n_events
    FROM outcomes
)
SELECT dataset,
       's' || CAST(session_hash AS VARCHAR) AS session_id,
       query_id, query_text, product_id, pair_id, CAST(position AS INTEGER) AS position,
       unnest(['impression', 'click', 'add_to_cart', 'purchase'][1:n_events]) AS event_type,
       session_ts + to_seconds(unnest([0, 5 + position, 60 + position, 300 + position][1:n_events])) AS ts,
       true AS simulated,
       $batch_id AS batch_id,
       -- the oracle's input, never read by the audit: on impressions only
       unnest([examination, NULL, NULL, NULL][1:n_events]) AS true_examination
FROM counted
