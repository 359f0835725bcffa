-- A pair's whole label history in one scheme, oldest first; `undone` marks decisions taken back.
-- Parameters: $pair_id, $scheme.
SELECT l.label_id, l.label, l.grade, l.source, l.author, l.probs, l.confidence, l.comment,
       l.needs_review, l.created_at,
       EXISTS (SELECT 1 FROM review_events e WHERE e.action = 'undo' AND e.label_id = l.label_id) AS undone
FROM labels l
WHERE l.pair_id = $pair_id AND l.scheme = $scheme
ORDER BY l.label_id;
