-- Each step's latest 'ok' metrics within a loop run ($prefix = 'loop:%').
SELECT kind, arg_max(metrics, finished_at) FROM runs
WHERE parent_run_id = $loop_run_id AND kind LIKE $prefix AND status = 'ok'
GROUP BY kind
