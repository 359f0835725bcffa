-- mine-refine store, schema 0006: the review UI's event log.
--
-- Every annotator action in the review UI is one row: a decision (which also appended a human
-- row to `labels`), a skip, or an undo. Nothing is ever updated or deleted. An undo names the
-- label it takes back; that label stays in the history but no longer counts (`live_labels`),
-- so the pair's current label falls back to what it was before the decision.

CREATE TABLE review_events (
    event_id            VARCHAR PRIMARY KEY,   -- the decision id made when the item was shown: retries add nothing
    action              VARCHAR NOT NULL CHECK (action IN ('decide', 'skip', 'undo')),
    pair_id             VARCHAR NOT NULL,
    scheme              VARCHAR NOT NULL,
    annotator           VARCHAR NOT NULL,
    label_id            BIGINT,                -- decide: the label written; undo: the label taken back
    queue_source        VARCHAR,               -- why the item was shown: audit | uncertain | disputed | overlap | mined | direct
    shown_label_id      BIGINT,                -- the pair's newest label_id when it was shown
    changed_since_shown BOOLEAN NOT NULL DEFAULT false,
    shown_at            TIMESTAMP,
    created_at          TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Label history without the labels an annotator took back with "undo".
CREATE VIEW live_labels AS
SELECT l.* FROM labels l
WHERE NOT EXISTS (
    SELECT 1 FROM review_events e WHERE e.action = 'undo' AND e.label_id = l.label_id
);

-- As in 0001, but an undone decision no longer counts.
CREATE OR REPLACE VIEW current_labels AS
SELECT * EXCLUDE (precedence_rank) FROM (
    SELECT l.*,
           row_number() OVER (
               PARTITION BY l.pair_id, l.scheme
               ORDER BY CASE l.source WHEN 'human' THEN 0 WHEN 'llm' THEN 1 WHEN 'audit' THEN 2 ELSE 3 END,
                        l.created_at DESC, l.label_id DESC
           ) AS precedence_rank
    FROM live_labels l
) WHERE precedence_rank = 1;
