-- The current flags of each pair (view `current_flags`), with `flagged` at a chosen threshold:
-- the human decision when one was made, else probability >= $threshold.
-- Parameters: $threshold, $pair_ids (NULL: every pair), $scheme (NULL: every scheme).
SELECT pair_id, scheme, label_id, source, flag, probability, decision,
       coalesce(decision, probability >= $threshold) AS flagged
FROM current_flags
WHERE ($pair_ids::VARCHAR[] IS NULL OR list_contains($pair_ids::VARCHAR[], pair_id))
  AND ($scheme::VARCHAR IS NULL OR scheme = $scheme)
ORDER BY pair_id, scheme, flag;
