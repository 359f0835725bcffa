-- Normalise a raw event source (the `raw_events` view) into engagement_events' columns, keeping
-- the source row number for error messages. Ids are computed the way labelstore/ids.py does.
-- Positions are stored 1-based; $position_base is the source's first position (0 or 1).
SELECT row_number() OVER () AS source_row,
       $dataset AS dataset,
       CAST(session_id AS VARCHAR) AS session_id,
       CAST(query AS VARCHAR) AS query_text,
       CAST(product_id AS VARCHAR) AS source_product_id,
       TRY_CAST(position AS INTEGER) + 1 - $position_base AS position,
       lower(CAST(event_type AS VARCHAR)) AS event_type,
       TRY_CAST(ts AS TIMESTAMP) AS ts,
       coalesce(TRY_CAST(simulated AS BOOLEAN), false) AS simulated
FROM raw_events
