-- The flags of the current labels that export_current.sql writes (same $scheme / $source filters):
-- one row per (pair, scheme, flag), pivoted into flag_<name> / flag_<name>_decision columns in Python.
SELECT pair_id, scheme, flag, probability, decision
FROM current_flags
WHERE ($scheme IS NULL OR scheme = $scheme) AND ($source IS NULL OR source = $source)
ORDER BY pair_id, scheme, flag;
