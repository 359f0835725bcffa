-- The flags of every label that export_history.sql writes (same $scheme / $source filters):
-- one row per (label, flag), pivoted into flag_<name> / flag_<name>_decision columns in Python.
SELECT f.label_id, f.flag, f.probability, f.decision
FROM label_flags f
JOIN labels l USING (label_id)
WHERE ($scheme IS NULL OR l.scheme = $scheme) AND ($source IS NULL OR l.source = $source)
ORDER BY f.label_id, f.flag;
