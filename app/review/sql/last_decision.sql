-- An annotator's newest decision that is not undone yet (what "undo last" takes back).
-- Parameters: $annotator.
SELECT e.label_id, e.pair_id, e.scheme, l.label
FROM review_events e
JOIN labels l ON l.label_id = e.label_id
WHERE e.action = 'decide' AND e.annotator = $annotator
  AND NOT EXISTS (SELECT 1 FROM review_events u WHERE u.action = 'undo' AND u.label_id = e.label_id)
ORDER BY e.created_at DESC, e.label_id DESC
LIMIT 1;
