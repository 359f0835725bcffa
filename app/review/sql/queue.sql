-- The review queue: the (pair, scheme) items where a human decision changes the most, best first.
--
-- Tiers (lower first):
--  -1 flagged    only with $flag_priority set (NULL: off): the current label is an LLM label that gives a
--                policy flag a probability of at least $flag_priority (label_flags, migration 0010)
--   0 audit      an open re-annotation request from the auditor (queued after the last human decision)
--   1 uncertain  the current label is an LLM label below $min_confidence, or the LLM asked for review
--   2 disputed   the current human label differs from the newest LLM label; fewer than 2 annotators so far
--                (not an overlap item still collecting its blind decisions: its reason would tell the label)
--   3 overlap    a deterministic $overlap share of items (`in_overlap`, migration 0009), decided blind by
--                $overlap_k annotators: queued while it has at least one and fewer than $overlap_k
--   4 mined      a mining candidate with no human or LLM label yet
-- Within a tier the higher score comes first (flagged: the highest flag probability). Items this annotator decided are left out; items
-- they skipped come after everything else. Undone decisions do not count (live_labels).
-- `blind` marks overlap items; their current label is not given (the review page hides it too), nor
-- `flag_probability` (the highest flag probability of the pair's newest LLM label). With $blind_llm, a blind
-- item that would be queued as flagged or uncertain is queued as overlap instead (`shown_candidates`).
-- Parameters: $annotator, $min_confidence, $flag_priority, $overlap, $overlap_k, $blind_llm, $default_scheme, $sources, $label, $query_text, $dataset.
WITH
humans AS (
    SELECT pair_id, scheme,
           count(DISTINCT author) AS n_annotators,
           bool_or(author = $annotator) AS decided_by_me,
           max(created_at) AS last_human_at
    FROM live_labels
    WHERE source = 'human'
    GROUP BY pair_id, scheme
),
latest_llm AS (
    SELECT pair_id, scheme, label, confidence, label_id
    FROM live_labels
    WHERE source = 'llm'
    QUALIFY row_number() OVER (PARTITION BY pair_id, scheme ORDER BY created_at DESC, label_id DESC) = 1
),
label_flag_max AS (
    SELECT label_id, max(probability) AS probability, arg_max(flag, probability) AS flag
    FROM label_flags
    WHERE probability IS NOT NULL
    GROUP BY label_id
),
dataset_scheme AS (
    SELECT p.dataset, mode(l.scheme) AS scheme
    FROM live_labels l JOIN pairs p ON p.pair_id = l.pair_id
    GROUP BY p.dataset
),
pair_scheme AS (
    SELECT p.pair_id, coalesce(newest.scheme, ds.scheme, $default_scheme) AS scheme
    FROM pairs p
    LEFT JOIN (SELECT pair_id, arg_max(scheme, label_id) AS scheme FROM live_labels GROUP BY pair_id) newest
           ON newest.pair_id = p.pair_id
    LEFT JOIN dataset_scheme ds ON ds.dataset = p.dataset
    WHERE p.pair_id IN (SELECT pair_id FROM review_queue UNION SELECT pair_id FROM mining_candidates)
),
candidates AS (
    SELECT c.pair_id, c.scheme, -1 AS tier, 'flagged' AS source, f.probability AS score,
           'LLM flag ' || f.flag || ' ' || printf('%.2f', f.probability) AS reason
    FROM current_labels c
    JOIN label_flag_max f ON f.label_id = c.label_id
    WHERE $flag_priority::DOUBLE IS NOT NULL AND c.source = 'llm' AND f.probability >= $flag_priority

    UNION ALL
    SELECT q.pair_id, ps.scheme, 0, 'audit',
           max(q.priority) AS score, arg_max(q.reason, q.priority) AS reason
    FROM review_queue q
    JOIN pair_scheme ps ON ps.pair_id = q.pair_id
    LEFT JOIN humans h ON h.pair_id = q.pair_id AND h.scheme = ps.scheme
    WHERE h.last_human_at IS NULL OR q.created_at > h.last_human_at
    GROUP BY q.pair_id, ps.scheme

    UNION ALL
    SELECT c.pair_id, c.scheme, 1, 'uncertain', 1.0 - coalesce(c.confidence, 0.0),
           CASE WHEN c.needs_review THEN 'the LLM asked for review'
                ELSE 'LLM confidence ' || printf('%.2f', c.confidence) END
    FROM current_labels c
    WHERE c.source = 'llm' AND (c.needs_review OR coalesce(c.confidence, 1.0) < $min_confidence)

    UNION ALL
    SELECT c.pair_id, c.scheme, 2, 'disputed', coalesce(m.confidence, 0.5),
           'human said ' || c.label || ', LLM says ' || m.label
    FROM current_labels c
    JOIN latest_llm m ON m.pair_id = c.pair_id AND m.scheme = c.scheme
    JOIN humans h ON h.pair_id = c.pair_id AND h.scheme = c.scheme
    WHERE c.source = 'human' AND m.label <> c.label AND h.n_annotators < 2
      AND NOT (in_overlap(c.pair_id, c.scheme, $overlap) AND h.n_annotators < $overlap_k)

    UNION ALL
    SELECT h.pair_id, h.scheme, 3, 'overlap', 0.0,
           'blind overlap: ' || h.n_annotators || ' of ' || $overlap_k || ' annotators so far'
    FROM humans h
    WHERE h.n_annotators < $overlap_k AND in_overlap(h.pair_id, h.scheme, $overlap)

    UNION ALL
    SELECT m.pair_id, ps.scheme, 4, 'mined', max(coalesce(-m.rank, m.score, 0.0)), arg_min(m.reason, m.rank)
    FROM mining_candidates m
    JOIN pair_scheme ps ON ps.pair_id = m.pair_id
    WHERE NOT EXISTS (
        SELECT 1 FROM live_labels l
        WHERE l.pair_id = m.pair_id AND l.scheme = ps.scheme AND l.source IN ('human', 'llm')
    )
    GROUP BY m.pair_id, ps.scheme
),
shown_candidates AS (
    -- with $blind_llm a blind item is not queued as flagged or uncertain (the source, its reason and the
    -- item's place in the queue would tell the LLM's output): it waits as an overlap item, decided by nobody yet
    SELECT pair_id, scheme,
           CASE WHEN hide THEN 3 ELSE tier END AS tier,
           CASE WHEN hide THEN 'overlap' ELSE source END AS source,
           CASE WHEN hide THEN 0.0 ELSE score END AS score,
           CASE WHEN hide THEN 'blind overlap: 0 of ' || $overlap_k || ' annotators so far' ELSE reason END AS reason
    FROM (SELECT *, $blind_llm AND source IN ('flagged', 'uncertain') AND in_overlap(pair_id, scheme, $overlap) AS hide
          FROM candidates)
),
items AS (
    SELECT pair_id, scheme, min(tier) AS tier,
           arg_min(source, tier) AS source, arg_min(score, tier) AS score, arg_min(reason, tier) AS reason,
           string_agg(source, ',' ORDER BY tier) AS all_sources
    FROM (SELECT * FROM shown_candidates
          QUALIFY row_number() OVER (PARTITION BY pair_id, scheme, source ORDER BY tier) = 1)
    GROUP BY pair_id, scheme
),
my_skips AS (
    SELECT pair_id, scheme, max(created_at) AS skipped_at
    FROM review_events
    WHERE action = 'skip' AND annotator = $annotator
    GROUP BY pair_id, scheme
)
SELECT i.pair_id, i.scheme, i.source, i.reason, i.score, i.tier, i.all_sources,
       p.dataset, q.text AS query, pr.title,
       CASE WHEN i.blind THEN NULL ELSE c.label END AS current_label,
       CASE WHEN i.blind THEN NULL ELSE c.source END AS current_source,
       CASE WHEN i.blind THEN NULL ELSE c.confidence END AS current_confidence,
       CASE WHEN i.blind THEN NULL ELSE lf.probability END AS flag_probability,
       s.skipped_at IS NOT NULL AS skipped, i.blind
FROM (SELECT *, in_overlap(pair_id, scheme, $overlap) AS blind FROM items) i
JOIN pairs p ON p.pair_id = i.pair_id
JOIN queries q ON q.query_id = p.query_id
JOIN products pr ON pr.product_id = p.product_id
LEFT JOIN current_labels c ON c.pair_id = i.pair_id AND c.scheme = i.scheme
LEFT JOIN humans h ON h.pair_id = i.pair_id AND h.scheme = i.scheme
LEFT JOIN latest_llm m ON m.pair_id = i.pair_id AND m.scheme = i.scheme
LEFT JOIN label_flag_max lf ON lf.label_id = m.label_id
LEFT JOIN my_skips s ON s.pair_id = i.pair_id AND s.scheme = i.scheme
WHERE NOT coalesce(h.decided_by_me, false)
  AND (len($sources::VARCHAR[]) = 0 OR list_contains($sources::VARCHAR[], i.source))
  AND ($dataset::VARCHAR IS NULL OR p.dataset = $dataset)
  AND ($label::VARCHAR IS NULL OR (c.label = $label AND NOT i.blind))
  AND ($query_text::VARCHAR IS NULL OR contains(lower(q.text), lower($query_text)))
ORDER BY skipped, i.tier, i.score DESC, i.pair_id;
