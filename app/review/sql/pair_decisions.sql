-- Each annotator's live decision on one pair (adjudications left out), by annotator.
-- Parameters: $pair_id, $scheme.
SELECT author AS annotator, label
FROM live_labels
WHERE pair_id = $pair_id AND scheme = $scheme AND source = 'human'
  AND label_id NOT IN (SELECT label_id FROM adjudications)
QUALIFY row_number() OVER (PARTITION BY author ORDER BY created_at DESC, label_id DESC) = 1
ORDER BY author;
