-- mine-refine store, schema 0005: the annotator's resumable label runs.
-- A label run freezes its selection when it starts, so a resumed run labels exactly the pairs it
-- selected, each once (labels.dedup_key = '<run_id>:<pair_id>').

CREATE TABLE label_runs (
    run_id          VARCHAR PRIMARY KEY,   -- runs.run_id (kind 'label')
    fingerprint     VARCHAR NOT NULL,      -- hash of selection + policy version + model + adapter + backend
    selection       VARCHAR NOT NULL,      -- unlabeled | mined | flagged | query-file
    policy          VARCHAR NOT NULL,
    policy_version  VARCHAR NOT NULL,
    scheme          VARCHAR NOT NULL,
    author          VARCHAR NOT NULL,      -- model + adapter + prompt hash, as written to labels.author
    n_selected      INTEGER NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE label_run_items (
    run_id   VARCHAR NOT NULL,
    ordinal  INTEGER NOT NULL,             -- labelling order
    pair_id  VARCHAR NOT NULL,
    PRIMARY KEY (run_id, pair_id)
);
