-- Each annotator's live decision on one pair (adjudications left out), by annotator.
-- Parameters: $pair_id, $scheme.
SELECT annotator, label FROM human_decisions WHERE pair_id = $pair_id AND scheme = $scheme ORDER BY annotator;
