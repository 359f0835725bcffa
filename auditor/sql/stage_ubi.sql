-- OpenSearch User Behavior Insights (UBI) -> engagement events.
-- ubi_queries: query_id, user_query, timestamp, client_id, query_response_hit_ids (list of object ids).
-- ubi_events:  action_name, query_id, session_id, client_id, timestamp,
--              event_attributes.object.object_id, event_attributes.position.ordinal.
-- Impressions come from each query's hit list (position = 1-based index); an event's position is
-- the object's place in that list, else its position ordinal.
WITH hits AS (
    SELECT q.query_id AS ubi_query_id, q.user_query, TRY_CAST(q.timestamp AS TIMESTAMP) AS ts,
           CAST(q.client_id AS VARCHAR) AS client_id,
           CAST(unnest(q.query_response_hit_ids) AS VARCHAR) AS object_id,
           generate_subscripts(q.query_response_hit_ids, 1) AS position
    FROM ubi_queries q
),
sessions AS (
    SELECT query_id AS ubi_query_id, any_value(CAST(session_id AS VARCHAR)) AS session_id FROM ubi_events GROUP BY ALL
),
impressions AS (
    SELECT coalesce(s.session_id, h.client_id, h.ubi_query_id) AS session_id, h.user_query AS query_text,
           h.object_id AS source_product_id, h.position, 'impression' AS event_type, h.ts
    FROM hits h LEFT JOIN sessions s USING (ubi_query_id)
),
actions AS (
    SELECT coalesce(CAST(e.session_id AS VARCHAR), CAST(e.client_id AS VARCHAR), e.query_id) AS session_id,
           q.user_query AS query_text,
           CAST(e.event_attributes.object.object_id AS VARCHAR) AS source_product_id,
           coalesce(h.position, TRY_CAST(e.event_attributes.position.ordinal AS INTEGER)) AS position,
           CASE lower(e.action_name)
               WHEN 'click' THEN 'click' WHEN 'product_click' THEN 'click' WHEN 'click_through' THEN 'click'
               WHEN 'add_to_cart' THEN 'add_to_cart' WHEN 'purchase' THEN 'purchase' WHEN 'checkout' THEN 'purchase'
           END AS event_type,
           TRY_CAST(e.timestamp AS TIMESTAMP) AS ts
    FROM ubi_events e
    LEFT JOIN ubi_queries q USING (query_id)
    LEFT JOIN hits h ON h.ubi_query_id = e.query_id AND h.object_id = CAST(e.event_attributes.object.object_id AS VARCHAR)
)
SELECT row_number() OVER () AS source_row, $dataset AS dataset, session_id, query_text, source_product_id,
       position, position IS NULL AS position_blank, event_type, ts, false AS simulated
FROM (SELECT * FROM impressions UNION ALL SELECT * FROM actions WHERE event_type IS NOT NULL)
