-- mine-refine store, schema 0010: policy flags beside the grade.
--
-- A policy may declare flags (`[[flags]]` in its TOML: prohibited, adult, ...). Every label can
-- carry, per flag, the labeler's calibrated probability that the flag applies and, for a human
-- label, the reviewer's decision (true: set, false: cleared). Rows belong to a label and are
-- written with it, in the same transaction; like labels they are never updated.

CREATE TABLE label_flags (
    label_id     BIGINT NOT NULL,
    flag         VARCHAR NOT NULL,
    probability  DOUBLE CHECK (probability IS NULL OR (probability >= 0 AND probability <= 1)),
    decision     BOOLEAN,                 -- a human's set (true) / clear (false); null: none made
    PRIMARY KEY (label_id, flag),
    CHECK (probability IS NOT NULL OR decision IS NOT NULL)
);

-- The current state of each (pair, scheme, flag), which is about the pair, not any one label: a later
-- label that does not mention a flag (an adjudication, a second reviewer who left it untouched, a relabel
-- with --no-flags) does not unflag it.
--   decision     the newest live human decision on it (review or import), whatever label carried it
--   probability  the newest live LLM label's probability for it (else the one the decision was shown)
--   flagged      the decision when there is one, else probability >= 0.5 (callers with a tuned threshold
--                read `probability`)
--   label_id, source, created_at   the label that decided it (the decision's, else the probability's)
CREATE VIEW current_flags AS
WITH flag_rows AS (
    SELECT l.pair_id, l.scheme, l.label_id, l.source, l.created_at, f.flag, f.probability, f.decision
    FROM live_labels l
    JOIN label_flags f USING (label_id)
),
decided AS (
    SELECT * FROM flag_rows
    WHERE decision IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY pair_id, scheme, flag ORDER BY created_at DESC, label_id DESC) = 1
),
scored AS (
    SELECT * FROM flag_rows
    WHERE probability IS NOT NULL AND source = 'llm'
    QUALIFY row_number() OVER (PARTITION BY pair_id, scheme, flag ORDER BY created_at DESC, label_id DESC) = 1
),
merged AS (
    SELECT coalesce(d.pair_id, s.pair_id) AS pair_id, coalesce(d.scheme, s.scheme) AS scheme,
           coalesce(d.label_id, s.label_id) AS label_id, coalesce(d.source, s.source) AS source,
           coalesce(d.created_at, s.created_at) AS created_at, coalesce(d.flag, s.flag) AS flag,
           coalesce(s.probability, d.probability) AS probability, d.decision
    FROM decided d
    FULL OUTER JOIN scored s ON s.pair_id = d.pair_id AND s.scheme = d.scheme AND s.flag = d.flag
)
SELECT pair_id, scheme, label_id, source, created_at, flag, probability, decision,
       coalesce(decision, probability >= 0.5) AS flagged
FROM merged;
