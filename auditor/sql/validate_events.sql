-- Problems in staged events: one row per (source_row, field, message), at most 50.
SELECT source_row, field, message FROM (
    SELECT source_row, 'session_id' AS field, 'missing session id' AS message FROM staged_events WHERE session_id IS NULL OR session_id = ''
    UNION ALL SELECT source_row, 'query', 'missing query text' FROM staged_events WHERE query_text IS NULL OR trim(query_text) = ''
    UNION ALL SELECT source_row, 'product_id', 'missing product id' FROM staged_events WHERE source_product_id IS NULL OR source_product_id = ''
    UNION ALL SELECT source_row, 'position', 'position is not an integer' FROM staged_events WHERE NOT position_blank AND position IS NULL
    UNION ALL SELECT source_row, 'position', 'position below the first position (1; a log that counts from 0 takes --position-base 0)' FROM staged_events WHERE position < 1
    UNION ALL SELECT source_row, 'position', 'an impression needs a position' FROM staged_events WHERE position_blank AND event_type = 'impression'
    UNION ALL SELECT source_row, 'position', 'a click needs a position: none given, and no impression of this product in its session to take it from'
        FROM staged_events WHERE position IS NULL AND position_blank AND event_type = 'click'
    UNION ALL SELECT source_row, 'event_type', 'event_type must be impression, click, add_to_cart or purchase (or view, add-to-cart, cart, order, checkout)' FROM staged_events
        WHERE event_type IS NULL OR event_type NOT IN ('impression', 'click', 'add_to_cart', 'purchase')
    UNION ALL SELECT source_row, 'ts', 'timestamp missing or unreadable' FROM staged_events WHERE ts IS NULL
) ORDER BY source_row, field LIMIT 50
