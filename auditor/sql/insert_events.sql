-- Staged events into the store, with ids computed as labelstore/ids.py does. A session's repeated events of one
-- kind for one product (a double click, a logging retry, the results shown again after going back) are kept
-- once, the first: the click models behind the audit make one look-and-click decision per session and product,
-- and a repeat would count as a click on an impression that never happened. Not for UBI ($collapse_repeats
-- false): its impressions come one per search, and its session can be a client id spanning many searches.
INSERT INTO engagement_events (dataset, session_id, query_id, query_text, product_id, pair_id, position,
                               event_type, ts, simulated, batch_id)
SELECT dataset, session_id, query_id, query_text, product_id, mnr_pair_id(query_id, product_id), position,
       event_type, ts, simulated, $batch_id
FROM (
    SELECT *, mnr_query_id(dataset, query_text) AS query_id, mnr_product_id(dataset, source_product_id) AS product_id
    FROM staged_events
    QUALIFY NOT $collapse_repeats
            OR row_number() OVER (PARTITION BY session_id, query_id, product_id, event_type ORDER BY ts, source_row) = 1
)
