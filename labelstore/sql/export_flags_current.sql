-- The flags of the pairs export_current.sql writes (view `current_flags`, one row per (pair, scheme, flag)),
-- pivoted into flag_<name> / flag_<name>_decision columns in Python and joined onto the exported rows by
-- (pair_id, scheme), so $source filters the labels, not the flags. Parameters: $scheme.
SELECT pair_id, scheme, flag, probability, decision
FROM current_flags
WHERE ($scheme IS NULL OR scheme = $scheme)
ORDER BY pair_id, scheme, flag;
