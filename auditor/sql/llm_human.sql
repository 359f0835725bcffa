-- Pairs with both a human and an LLM label (the newest of each): the raw material of the
-- LLM-vs-human flags and of the agreement-over-time drift series. window_start buckets the human label.
WITH newest AS (
    SELECT pair_id, source, label, grade, confidence, created_at,
           row_number() OVER (PARTITION BY pair_id, source ORDER BY created_at DESC, label_id DESC) AS k
    FROM labels
    WHERE scheme = $scheme AND source IN ('human', 'llm')
)
SELECT h.pair_id, h.label AS human_label, h.grade AS human_grade, l.label AS llm_label, l.grade AS llm_grade,
       l.confidence AS llm_confidence, h.created_at AS human_at,
       time_bucket(to_days(CAST($window_days AS INTEGER)), h.created_at, CAST($origin AS TIMESTAMP)) AS window_start
FROM newest h JOIN newest l ON h.pair_id = l.pair_id AND h.k = 1 AND l.k = 1
WHERE h.source = 'human' AND l.source = 'llm'
