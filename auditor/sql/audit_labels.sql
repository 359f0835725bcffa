-- The current label of every pair of the audited scheme, computed once per audit (the
-- current_labels view ranks the whole label history each time it is read).
SELECT pair_id, label, grade, source, confidence FROM current_labels WHERE scheme = $scheme
