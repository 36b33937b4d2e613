-- The same model as the SQLite backend (its migrations 0001-0006), for several
-- broker replicas sharing one database. Timestamps are milliseconds since the epoch.

CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    workload    TEXT NOT NULL,
    audience    TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    body        TEXT NOT NULL,
    cleanup_at  BIGINT,
    idle_at     BIGINT
);
CREATE INDEX grants_live_by_expiry ON grants (expires_at) WHERE state IN ('active', 'pending');
CREATE INDEX grants_by_workload ON grants (workload, created_at);
CREATE INDEX grants_by_task ON grants (task_id);
CREATE INDEX grants_cleanup_due ON grants (cleanup_at) WHERE cleanup_at IS NOT NULL;
CREATE INDEX grants_by_audience ON grants (audience, state);
CREATE INDEX grants_by_state ON grants (state, created_at, id);
CREATE INDEX grants_idle_due ON grants (idle_at) WHERE idle_at IS NOT NULL;

-- One audit chain for every replica: entries are appended only while holding the
-- lock on the `audit_checkpoint` row, so their order is total and gap-free.
CREATE TABLE audit (
    seq       BIGINT PRIMARY KEY,
    at        BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    grant_id  TEXT,
    actor     TEXT NOT NULL,
    data      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_by_grant ON audit (grant_id) WHERE grant_id IS NOT NULL;

-- The signed head of the chain, and the serialisation point of every write: each
-- commit locks this row first, appends, and re-signs it. `feed_seq` is the newest
-- revocation-feed sequence number (assigned here, so it has no gaps — a database
-- sequence would skip numbers on rollback).
CREATE TABLE audit_checkpoint (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    seq       BIGINT NOT NULL,
    hash      TEXT NOT NULL,
    kid       TEXT NOT NULL,
    signature TEXT NOT NULL,
    at        BIGINT NOT NULL,
    feed_seq  BIGINT NOT NULL
);
INSERT INTO audit_checkpoint (id, seq, hash, kid, signature, at, feed_seq)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', '', '', 0, 0);

CREATE TABLE feed (
    seq       BIGINT PRIMARY KEY,
    at        BIGINT NOT NULL,
    grant_id  TEXT NOT NULL,
    state     TEXT NOT NULL,
    audience  TEXT NOT NULL,
    jti       TEXT,
    exp       BIGINT NOT NULL,
    reason    TEXT NOT NULL
);

CREATE TABLE nonces (
    value      TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX nonces_by_expiry ON nonces (expires_at);

CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,
    alg          TEXT NOT NULL,
    public       BYTEA NOT NULL,
    sealed       BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    activates_at BIGINT NOT NULL,
    retires_at   BIGINT
);
