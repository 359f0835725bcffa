-- Each session's first clicked position, keyed by a hash of the session id (8 bytes a session, so a
-- log of tens of millions of sessions stays small). An impression below a session's first click
-- was seen by a shopper who had already clicked: under a sequential click model (cascade, DBN)
-- whether it was examined depends on that click, not on its position alone.
SELECT hash(session_id) AS session_key, min(position) AS first_click
FROM audit_events
WHERE event_type = 'click' AND session_id IS NOT NULL AND position IS NOT NULL
GROUP BY session_key
