-- The current human flag decisions (true: set, false: cleared) of the pairs $pair_ids under $scheme (view
-- `current_flags`: the newest live decision per flag, whichever label carried it), for fine-tuning to learn
-- flags beside the grade; a flag with only a labeler probability is left out.
SELECT pair_id, flag, decision
FROM current_flags
WHERE decision IS NOT NULL AND scheme = $scheme AND list_contains($pair_ids::VARCHAR[], pair_id)
ORDER BY pair_id, flag
