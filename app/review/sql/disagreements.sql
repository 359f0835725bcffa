-- Pairs whose annotators disagree and that no admin has adjudicated since their newest decision, with
-- each annotator's live decision (`human_decisions`). Parameters: $scheme.
WITH
decisions AS (SELECT * FROM human_decisions WHERE scheme = $scheme),
pairs_in_dispute AS (
    SELECT pair_id, max(created_at) AS last_decision_at
    FROM decisions
    GROUP BY pair_id
    HAVING count(*) >= 2 AND count(DISTINCT label) >= 2
)
SELECT d.pair_id, q.text AS query, pr.title,
       string_agg(d.annotator || '=' || d.label, '; ' ORDER BY d.annotator) AS decisions
FROM pairs_in_dispute x
JOIN decisions d ON d.pair_id = x.pair_id
JOIN pairs p ON p.pair_id = x.pair_id
JOIN queries q ON q.query_id = p.query_id
JOIN products pr ON pr.product_id = p.product_id
WHERE NOT EXISTS (
    SELECT 1 FROM adjudications a
    JOIN live_labels l ON l.label_id = a.label_id
    WHERE a.pair_id = x.pair_id AND a.scheme = $scheme AND a.created_at >= x.last_decision_at
)
GROUP BY d.pair_id, q.text, pr.title
ORDER BY d.pair_id;
