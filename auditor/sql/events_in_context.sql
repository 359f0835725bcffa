-- The audit's events with their click context: after_click is true for an event below its session's
-- first click (first_clicks.sql); events of sessions without a click, or without a session id, are
-- never after a click.
SELECT e.*, coalesce(e.position > f.first_click, false) AS after_click
FROM audit_events e
LEFT JOIN audit_first_clicks f ON f.session_key = hash(e.session_id)
