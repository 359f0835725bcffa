-- Normalise a raw event source (the `raw_events` view) into engagement_events' columns, keeping
-- the source row number for error messages. Ids are computed the way labelstore/ids.py does.
-- Positions are stored 1-based; $position_base is the source's first position (0 or 1).
-- Event types: the four stored names, and common other spellings of them (view, add-to-cart, order, ...).
-- Logs often record add-to-carts and purchases (made on the product page) and sometimes clicks without a
-- position: such an event takes the position its product was shown at in the session (its impression's);
-- an add-to-cart or purchase with none to take stays without one and still counts for its pair.
WITH typed AS (
    SELECT row_number() OVER () AS source_row,
           $dataset AS dataset,
           CAST(session_id AS VARCHAR) AS session_id,
           CAST(query AS VARCHAR) AS query_text,
           CAST(product_id AS VARCHAR) AS source_product_id,
           TRY_CAST(position AS INTEGER) + 1 - $position_base AS given_position,
           coalesce(trim(CAST(position AS VARCHAR)), '') = '' AS position_blank,
           CASE replace(replace(lower(trim(CAST(event_type AS VARCHAR))), '-', '_'), ' ', '_')
               WHEN 'view' THEN 'impression' WHEN 'impressions' THEN 'impression' WHEN 'shown' THEN 'impression'
               WHEN 'clicks' THEN 'click' WHEN 'clickthrough' THEN 'click' WHEN 'click_through' THEN 'click'
               WHEN 'addtocart' THEN 'add_to_cart' WHEN 'cart' THEN 'add_to_cart' WHEN 'add_cart' THEN 'add_to_cart'
               WHEN 'atc' THEN 'add_to_cart'
               WHEN 'order' THEN 'purchase' WHEN 'checkout' THEN 'purchase' WHEN 'buy' THEN 'purchase'
               WHEN 'conversion' THEN 'purchase'
               ELSE replace(replace(lower(trim(CAST(event_type AS VARCHAR))), '-', '_'), ' ', '_') END AS event_type,
           TRY_CAST(ts AS TIMESTAMP) AS ts,
           coalesce(TRY_CAST(simulated AS BOOLEAN), false) AS simulated
    FROM raw_events
)
SELECT * EXCLUDE (given_position),
       coalesce(given_position,
                CASE WHEN position_blank AND event_type <> 'impression'
                     -- the first impression's (insert_events.sql keeps that one of repeats), the query as ids see it
                     THEN arg_min(given_position, ts) FILTER (WHERE event_type = 'impression' AND given_position IS NOT NULL)
                              OVER (PARTITION BY session_id, trim(regexp_replace(lower(query_text), '\s+', ' ', 'g')),
                                                 source_product_id) END) AS position
FROM typed
