-- Each annotator's live decision per pair (`human_decisions`, migration 0009) beside the pair's
-- newest live LLM label and its newest adjudicated label, for one scheme. Adjudication labels are not
-- decisions. `blind` marks blind-overlap items. Parameters: $scheme, $overlap.
WITH
decisions AS (SELECT * FROM human_decisions WHERE scheme = $scheme),
latest_llm AS (
    SELECT pair_id, label AS llm_label, grade AS llm_grade
    FROM live_labels
    WHERE source = 'llm' AND scheme = $scheme
    QUALIFY row_number() OVER (PARTITION BY pair_id ORDER BY created_at DESC, label_id DESC) = 1
),
adjudicated AS (
    SELECT a.pair_id, arg_max(a.label, a.created_at) AS adjudicated_label
    FROM adjudications a
    JOIN live_labels l ON l.label_id = a.label_id
    WHERE a.scheme = $scheme
    GROUP BY a.pair_id
)
SELECT d.pair_id, d.annotator, d.label, d.grade, d.created_at, m.llm_label, m.llm_grade,
       j.adjudicated_label, in_overlap(d.pair_id, $scheme, $overlap) AS blind
FROM decisions d
LEFT JOIN latest_llm m ON m.pair_id = d.pair_id
LEFT JOIN adjudicated j ON j.pair_id = d.pair_id
ORDER BY d.created_at, d.pair_id, d.annotator;
