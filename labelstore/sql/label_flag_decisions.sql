-- The human flag decisions (true: set, false: cleared) of the labels $label_ids, for fine-tuning to learn
-- flags beside the grade; a flag with only a labeler probability is left out.
SELECT label_id, flag, decision
FROM label_flags
WHERE decision IS NOT NULL AND list_contains($label_ids, label_id)
ORDER BY label_id, flag
