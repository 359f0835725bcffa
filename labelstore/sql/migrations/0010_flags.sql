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

-- The flags of each pair's current label: `flagged` is the human decision when there is one,
-- else whether the probability reaches 0.5 (callers with a tuned threshold read `probability`).
CREATE VIEW current_flags AS
SELECT c.pair_id, c.scheme, c.label_id, c.source, f.flag, f.probability, f.decision,
       coalesce(f.decision, f.probability >= 0.5) AS flagged
FROM current_labels c
JOIN label_flags f USING (label_id);
