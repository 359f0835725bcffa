"""SQL of the annotator's batch job. Every value is bound ($name), never formatted in."""
from __future__ import annotations

# The text of a pair as the labeler sees it; {selection} is one of the SELECT_* constants below.
PAIR_TEXT_COLUMNS = "p.pair_id, q.text AS query, pr.title, pr.description, pr.brand"

SELECT_UNLABELED = f"""
SELECT {PAIR_TEXT_COLUMNS}
FROM pairs p JOIN queries q USING (query_id) JOIN products pr USING (product_id)
WHERE ($dataset IS NULL OR p.dataset = $dataset)
  AND NOT EXISTS (SELECT 1 FROM current_labels c WHERE c.pair_id = p.pair_id AND c.scheme = $scheme)
ORDER BY p.pair_id
LIMIT $limit
"""

# Candidates of the newest mining run (or of $mining_run), best rank first.
SELECT_MINED = f"""
WITH chosen AS (
    SELECT coalesce($mining_run, (SELECT run_id FROM mining_candidates ORDER BY created_at DESC, run_id DESC LIMIT 1))
        AS run_id
)
SELECT {PAIR_TEXT_COLUMNS}
FROM mining_candidates m JOIN chosen USING (run_id)
JOIN pairs p USING (pair_id) JOIN queries q USING (query_id) JOIN products pr USING (product_id)
WHERE ($dataset IS NULL OR p.dataset = $dataset)
ORDER BY m.rank NULLS LAST, m.score DESC NULLS LAST, p.pair_id
LIMIT $limit
"""

SELECT_FLAGGED = f"""
SELECT {PAIR_TEXT_COLUMNS}
FROM open_review_queue queued JOIN pairs p USING (pair_id) JOIN queries q USING (query_id) JOIN products pr USING (product_id)
WHERE ($dataset IS NULL OR p.dataset = $dataset)
ORDER BY queued.priority DESC, p.pair_id
LIMIT $limit
"""

SELECT_QUERY_FILE = f"""
SELECT {PAIR_TEXT_COLUMNS}
FROM pairs p JOIN queries q USING (query_id) JOIN products pr USING (product_id)
WHERE ($dataset IS NULL OR p.dataset = $dataset)
  AND lower(trim(regexp_replace(q.text, '\\s+', ' ', 'g'))) IN (SELECT unnest($queries))
ORDER BY q.text, p.pair_id
LIMIT $limit
"""

SELECTIONS = {
    "unlabeled": SELECT_UNLABELED,
    "mined": SELECT_MINED,
    "flagged": SELECT_FLAGGED,
    "query-file": SELECT_QUERY_FILE,
}

FIND_RESUMABLE_RUN = """
SELECT lr.run_id FROM label_runs lr JOIN runs r USING (run_id)
WHERE lr.fingerprint = $fingerprint AND r.status <> 'ok'
ORDER BY lr.created_at DESC LIMIT 1
"""

INSERT_LABEL_RUN = """
INSERT INTO label_runs (run_id, fingerprint, selection, policy, policy_version, scheme, author, n_selected)
VALUES ($run_id, $fingerprint, $selection, $policy, $policy_version, $scheme, $author, $n_selected)
"""

INSERT_RUN_ITEMS = """
INSERT INTO label_run_items (run_id, ordinal, pair_id)
SELECT $run_id, ordinal, pair_id FROM run_items_frame
"""

# Pairs of a run that have no label from that run yet, in labelling order.
PENDING_ITEMS = f"""
SELECT {PAIR_TEXT_COLUMNS}
FROM label_run_items i JOIN pairs p USING (pair_id) JOIN queries q USING (query_id) JOIN products pr USING (product_id)
WHERE i.run_id = $run_id
  AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.run_id = $run_id AND l.pair_id = i.pair_id)
ORDER BY i.ordinal
"""

# Every pair a run selected, labelled or not (the pairs whose scores it accepts back from outside).
RUN_ITEM_IDS = "SELECT pair_id FROM label_run_items WHERE run_id = $run_id"

LABEL_RUN_INFO = "SELECT * FROM label_runs WHERE run_id = $run_id"

RUN_LABEL_SUMMARY = """
SELECT label, count(*) AS n, avg(confidence) AS mean_confidence, sum(needs_review::INTEGER) AS needs_review
FROM labels WHERE run_id = $run_id GROUP BY label ORDER BY n DESC, label
"""

# Per policy flag: the run's labels that carry it and those whose probability reaches 0.5.
RUN_FLAG_SUMMARY = """
SELECT f.flag, count(*) AS n, count(*) FILTER (WHERE f.probability >= 0.5) AS flagged
FROM label_flags f JOIN labels l USING (label_id)
WHERE l.run_id = $run_id
GROUP BY f.flag ORDER BY f.flag
"""
