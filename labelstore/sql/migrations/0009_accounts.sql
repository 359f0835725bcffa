-- mine-refine store, schema 0009: annotator accounts, their audit trail, adjudications, blind overlap.
--
-- `accounts` holds who may use the review UI and in which role; it keeps only a salted slow hash of
-- each account's token (labelstore/accounts.py). It is the one table here that changes in place
-- (a disabled flag, a new token hash); every change, and every login attempt, is also appended to
-- `account_events`, which is never updated or deleted.
--
-- An adjudication is an admin's final word on a pair the annotators disagreed on: a human label
-- (author = the admin, dedup_key 'adjudicate:<id>') that becomes the pair's current label, plus a
-- row here saying it was an adjudication. Agreement figures leave these labels out.

CREATE TABLE accounts (
    name        VARCHAR PRIMARY KEY,
    role        VARCHAR NOT NULL CHECK (role IN ('annotator', 'admin')),
    token_hash  VARCHAR NOT NULL,          -- scrypt$n$r$p$<salt hex>$<hash hex>
    disabled    BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE SEQUENCE account_event_seq START 1;
CREATE TABLE account_events (
    event_id    BIGINT PRIMARY KEY DEFAULT nextval('account_event_seq'),
    action      VARCHAR NOT NULL CHECK (action IN ('add', 'disable', 'enable', 'reset_token', 'login', 'login_failed')),
    account     VARCHAR NOT NULL,          -- the name given (for a failed login, maybe no account's)
    method      VARCHAR,                   -- login: token | header; management: cli
    detail      VARCHAR,                   -- why a login failed, the role given, ...
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE adjudications (
    adjudication_id VARCHAR PRIMARY KEY,
    pair_id         VARCHAR NOT NULL,
    scheme          VARCHAR NOT NULL,
    admin           VARCHAR NOT NULL,
    label_id        BIGINT NOT NULL,       -- the label it wrote
    label           VARCHAR NOT NULL,
    decisions       VARCHAR,               -- the annotators' labels it settled, 'alice=exact; bob=substitute'
    created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Each annotator's live decision per (pair, scheme): their newest label not undone, adjudications left
-- out. Agreement, disagreements and adjudication read it.
CREATE VIEW human_decisions AS
SELECT pair_id, scheme, author AS annotator, label, grade, created_at, label_id
FROM live_labels
WHERE source = 'human' AND label_id NOT IN (SELECT label_id FROM adjudications)
QUALIFY row_number() OVER (PARTITION BY pair_id, scheme, author ORDER BY created_at DESC, label_id DESC) = 1;

-- Whether a (pair, scheme) falls in the blind-overlap share: deterministic, so every annotator and
-- every page agrees. The queue and the review page both ask this.
CREATE MACRO in_overlap(pair_id, scheme, share) AS (md5_number(pair_id || '|' || scheme) % 10000) < share * 10000;
