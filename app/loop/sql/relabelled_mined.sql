-- Mined pairs whose current label is an LLM relabel, with the labeler's confidence (NULL counts as 0).
SELECT c.pair_id, c.grade, coalesce(c.confidence, 0.0) AS confidence
FROM current_labels c
JOIN pairs p ON p.pair_id = c.pair_id
WHERE c.scheme = $scheme AND c.source = 'llm' AND p.origin = 'mined'
  AND ($dataset IS NULL OR p.dataset = $dataset)
ORDER BY c.pair_id
