-- How much the log lets position be told apart from product: the share of the sampled pairs'
-- impressions that belong to pairs shown at more than one position, the rarer positions holding at
-- least $min_share of the pair's impressions (exploration traffic or a ranker that reshuffles; a
-- fixed production ranker gives almost none).
WITH per_pair AS (
    SELECT pair_id, position, sum(impressions) AS impressions FROM audit_sample_cells GROUP BY ALL
),
pairs AS (
    SELECT pair_id, sum(impressions) AS impressions, max(impressions) AS at_main_position FROM per_pair GROUP BY pair_id
)
SELECT coalesce(sum(impressions) FILTER (WHERE at_main_position <= (1 - $min_share) * impressions)
                / nullif(sum(impressions), 0), 0) AS moved_share
FROM pairs
