-- Each step's latest attempt status within a loop run ($prefix = 'loop:%').
SELECT kind, arg_max(status, started_at) FROM runs
WHERE parent_run_id = $loop_run_id AND kind LIKE $prefix
GROUP BY kind
