-- Staged events into the store, with ids computed as labelstore/ids.py does.
INSERT INTO engagement_events (dataset, session_id, query_id, query_text, product_id, pair_id, position,
                               event_type, ts, simulated, batch_id)
SELECT dataset, session_id, query_id, query_text, product_id, mnr_pair_id(query_id, product_id), position,
       event_type, ts, simulated, $batch_id
FROM (
    SELECT *, mnr_query_id(dataset, query_text) AS query_id, mnr_product_id(dataset, source_product_id) AS product_id
    FROM staged_events
)
