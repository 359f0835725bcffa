-- Outputs of the latest 'ok' run of a step: within $loop_run_id when it has one, else any loop's.
SELECT metrics FROM runs
WHERE kind = $kind AND status = 'ok'
ORDER BY (parent_run_id IS NOT DISTINCT FROM $loop_run_id) DESC, finished_at DESC
LIMIT 1
