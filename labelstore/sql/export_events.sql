-- The audit trail, oldest first: every review event (decide, skip, undo), adjudication and account
-- event (add, disable, reset_token, login, login_failed) as one timeline. All three tables are
-- append-only. $scheme, when not null, keeps the pair events of that scheme (account events stay).
SELECT * FROM (
    SELECT e.created_at, 'review' AS kind, e.action, e.annotator AS actor, e.pair_id, e.scheme, e.label_id,
           l.label, e.queue_source AS detail, e.event_id
    FROM review_events e
    LEFT JOIN labels l ON l.label_id = e.label_id
    UNION ALL
    SELECT a.created_at, 'adjudication', 'adjudicate', a.admin, a.pair_id, a.scheme, a.label_id, a.label,
           'settled ' || coalesce(a.decisions, ''), a.adjudication_id
    FROM adjudications a
    UNION ALL
    SELECT a.created_at, 'account', a.action, a.account, NULL, NULL, NULL, NULL,
           concat_ws(': ', a.method, a.detail), CAST(a.event_id AS VARCHAR)
    FROM account_events a
)
WHERE $scheme IS NULL OR scheme IS NULL OR scheme = $scheme
ORDER BY created_at, kind, event_id;
