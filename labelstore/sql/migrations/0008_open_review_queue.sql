-- The open re-annotation queue, one home for its rule: each pair's newest queue entry, unless a human
-- labelled the pair (a decision that was not undone) after it was queued. The auditor's `open_queue`,
-- `mnr label --select flagged` and the review UI read it.
CREATE VIEW open_review_queue AS
SELECT n.pair_id, n.run_id, n.reason, n.priority, n.created_at
FROM (
    SELECT *, row_number() OVER (PARTITION BY pair_id ORDER BY created_at DESC, priority DESC) AS k
    FROM review_queue
) n
WHERE n.k = 1 AND NOT EXISTS (
    SELECT 1 FROM live_labels l WHERE l.pair_id = n.pair_id AND l.source = 'human' AND l.created_at >= n.created_at
);
