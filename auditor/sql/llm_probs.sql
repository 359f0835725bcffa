-- The newest LLM label of each pair of the scheme that carries per-label probabilities.
SELECT pair_id, probs AS llm_probs, author AS llm_author
FROM (
    SELECT pair_id, probs, author,
           row_number() OVER (PARTITION BY pair_id ORDER BY created_at DESC, label_id DESC) AS k
    FROM labels
    WHERE scheme = $scheme AND source = 'llm' AND probs IS NOT NULL
)
WHERE k = 1
