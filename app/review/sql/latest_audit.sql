-- The newest audit: the newest run of kind 'audit', else the run of the newest flag.
SELECT r.run_id, r.kind, r.status, r.params, r.metrics, r.error, r.started_at, r.finished_at
FROM runs r
WHERE r.kind = 'audit'
   OR r.run_id = (SELECT run_id FROM audit_flags ORDER BY created_at DESC, flag_id DESC LIMIT 1)
ORDER BY (r.kind = 'audit') DESC, r.started_at DESC
LIMIT 1;
