-- Each annotator's live decision per pair (their newest, undone ones left out) beside the pair's
-- newest live LLM label, for one scheme. Parameters: $scheme.
WITH
decisions AS (
    SELECT pair_id, author AS annotator, label, grade, created_at
    FROM live_labels
    WHERE source = 'human' AND scheme = $scheme
    QUALIFY row_number() OVER (PARTITION BY pair_id, author ORDER BY created_at DESC, label_id DESC) = 1
),
latest_llm AS (
    SELECT pair_id, label AS llm_label, grade AS llm_grade
    FROM live_labels
    WHERE source = 'llm' AND scheme = $scheme
    QUALIFY row_number() OVER (PARTITION BY pair_id ORDER BY created_at DESC, label_id DESC) = 1
)
SELECT d.pair_id, d.annotator, d.label, d.grade, d.created_at, m.llm_label, m.llm_grade
FROM decisions d
LEFT JOIN latest_llm m ON m.pair_id = d.pair_id
ORDER BY d.created_at, d.pair_id, d.annotator;
