-- mine-refine store, schema 0001: the system of record.
-- JSON-valued columns hold JSON text (VARCHAR) so the store needs no extension to open.

CREATE TABLE products (
    product_id   VARCHAR PRIMARY KEY,      -- '<dataset>:<source id>'
    dataset      VARCHAR NOT NULL,
    source_id    VARCHAR NOT NULL,
    title        VARCHAR NOT NULL,
    description  VARCHAR,
    brand        VARCHAR,
    attributes   VARCHAR,                  -- JSON object of further fields
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE queries (
    query_id     VARCHAR PRIMARY KEY,      -- '<dataset>:<hash of normalised text>'
    dataset      VARCHAR NOT NULL,
    text         VARCHAR NOT NULL,
    synthetic    BOOLEAN NOT NULL DEFAULT false,
    origin       VARCHAR NOT NULL DEFAULT 'import',   -- import | synthetic | log
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE pairs (
    pair_id          VARCHAR PRIMARY KEY,  -- hash of (query_id, product_id)
    dataset          VARCHAR NOT NULL,
    query_id         VARCHAR NOT NULL,
    product_id       VARCHAR NOT NULL,
    origin           VARCHAR NOT NULL DEFAULT 'import',  -- import | mined | synthetic | log
    raw_rating       DOUBLE,               -- the source's own rating, kept as given
    rating_variance  DOUBLE,
    created_at       TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE SEQUENCE label_seq START 1;
CREATE TABLE labels (
    label_id     BIGINT PRIMARY KEY DEFAULT nextval('label_seq'),
    pair_id      VARCHAR NOT NULL,
    scheme       VARCHAR NOT NULL,
    label        VARCHAR NOT NULL,
    grade        INTEGER NOT NULL,
    probs        VARCHAR,                  -- JSON {label: probability}, null when not probabilistic
    confidence   DOUBLE,                   -- probability of `label`, when known
    source       VARCHAR NOT NULL CHECK (source IN ('human', 'llm', 'audit', 'import')),
    author       VARCHAR NOT NULL,         -- annotator id, or model + adapter + prompt hash
    run_id       VARCHAR,
    comment      VARCHAR,
    needs_review BOOLEAN NOT NULL DEFAULT false,
    dedup_key    VARCHAR UNIQUE,           -- makes a write idempotent (re-ingest, resumed runs, UI retries)
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE engagement_events (
    dataset      VARCHAR,
    session_id   VARCHAR NOT NULL,
    query_id     VARCHAR,
    query_text   VARCHAR NOT NULL,
    product_id   VARCHAR NOT NULL,
    pair_id      VARCHAR,
    position     INTEGER,                  -- 1-based rank the product was shown at
    event_type   VARCHAR NOT NULL CHECK (event_type IN ('impression', 'click', 'add_to_cart', 'purchase')),
    ts           TIMESTAMP NOT NULL,
    simulated    BOOLEAN NOT NULL DEFAULT false,
    batch_id     VARCHAR NOT NULL          -- content hash of the ingested source: re-ingest adds nothing
);

CREATE SEQUENCE flag_seq START 1;
CREATE TABLE audit_flags (
    flag_id      BIGINT PRIMARY KEY DEFAULT nextval('flag_seq'),
    run_id       VARCHAR NOT NULL,
    pair_id      VARCHAR NOT NULL,
    kind         VARCHAR NOT NULL,         -- engagement | llm_vs_human | retriever | ...
    reason       VARCHAR NOT NULL,
    score        DOUBLE,
    evidence     VARCHAR,                  -- JSON
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE review_queue (
    pair_id      VARCHAR NOT NULL,
    run_id       VARCHAR NOT NULL,         -- the run that queued it
    reason       VARCHAR NOT NULL,
    priority     DOUBLE NOT NULL,          -- expected impact: higher first
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE mining_candidates (
    run_id       VARCHAR NOT NULL,
    pair_id      VARCHAR NOT NULL,
    model_id     VARCHAR,
    score        DOUBLE,
    rank         INTEGER,
    reason       VARCHAR NOT NULL,
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, pair_id)
);

CREATE TABLE runs (
    run_id       VARCHAR PRIMARY KEY,
    kind         VARCHAR NOT NULL,         -- ingest | label | finetune | train | mine | audit | trigger | loop-step | ...
    status       VARCHAR NOT NULL,         -- running | ok | failed
    params       VARCHAR,                  -- JSON
    metrics      VARCHAR,                  -- JSON
    error        VARCHAR,
    parent_run_id VARCHAR,
    started_at   TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at  TIMESTAMP
);

CREATE TABLE models (
    model_id        VARCHAR PRIMARY KEY,
    kind            VARCHAR NOT NULL,      -- retriever | labeler-adapter
    stage           VARCHAR,               -- zero-shot | stage1 | stage2 | lora
    path            VARCHAR NOT NULL,
    parent_model_id VARCHAR,
    data_hash       VARCHAR,
    metrics         VARCHAR,               -- JSON
    promoted        BOOLEAN NOT NULL DEFAULT false,
    run_id          VARCHAR,
    created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Each pair's current label per scheme. Precedence: the newest human label, else the newest
-- LLM label, else the newest audit label, else the newest import.
CREATE VIEW current_labels AS
SELECT * EXCLUDE (precedence_rank) FROM (
    SELECT l.*,
           row_number() OVER (
               PARTITION BY l.pair_id, l.scheme
               ORDER BY CASE l.source WHEN 'human' THEN 0 WHEN 'llm' THEN 1 WHEN 'audit' THEN 2 ELSE 3 END,
                        l.created_at DESC, l.label_id DESC
           ) AS precedence_rank
    FROM labels l
) WHERE precedence_rank = 1;
