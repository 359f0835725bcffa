-- The flag rows of some labels (probability and human decision), whatever their labels' standing.
-- Parameters: $label_ids.
SELECT label_id, flag, probability, decision
FROM label_flags
WHERE list_contains($label_ids::BIGINT[], label_id)
ORDER BY label_id, flag;
