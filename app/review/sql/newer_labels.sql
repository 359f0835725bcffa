-- Label rows of a pair written after it was shown (other than the decision being saved).
-- Parameters: $pair_id, $scheme, $shown_label_id, $dedup_key.
SELECT label_id, source, label, author, created_at
FROM labels
WHERE pair_id = $pair_id AND scheme = $scheme AND label_id > $shown_label_id
  AND dedup_key IS DISTINCT FROM $dedup_key
ORDER BY label_id;
