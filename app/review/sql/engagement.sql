-- Engagement evidence for one pair: raw counts, CTR and COEC (clicks over expected clicks).
-- Expected clicks add up, over the pair's impressions, the click-through rate of the position it
-- was shown at (measured over all logged events), so a pair shown low on the page is not punished
-- for the position it had. Parameters: $pair_id, $query_id, $product_id.
WITH
pair_events AS (
    SELECT event_type, position, simulated
    FROM engagement_events
    WHERE pair_id = $pair_id OR (query_id = $query_id AND product_id = $product_id)
),
position_ctr AS (
    SELECT position,
           count(*) FILTER (WHERE event_type = 'click') / count(*) FILTER (WHERE event_type = 'impression') AS ctr
    FROM engagement_events
    WHERE position IN (SELECT position FROM pair_events)
    GROUP BY position
    HAVING count(*) FILTER (WHERE event_type = 'impression') > 0
)
SELECT count(*) FILTER (WHERE event_type = 'impression') AS impressions,
       count(*) FILTER (WHERE event_type = 'click') AS clicks,
       count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_cart,
       count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
       (SELECT sum(c.ctr) FROM pair_events e JOIN position_ctr c ON c.position = e.position
        WHERE e.event_type = 'impression') AS expected_clicks,
       coalesce(bool_or(simulated), false) AS simulated
FROM pair_events;
