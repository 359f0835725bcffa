-- (run_id, status) of the newest loop run.
SELECT run_id, status FROM runs WHERE kind = $kind ORDER BY started_at DESC, run_id DESC LIMIT 1
