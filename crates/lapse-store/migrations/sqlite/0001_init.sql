-- Grants: indexed columns for the queries Lapse makes, the full record as JSON.
CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    workload    TEXT NOT NULL,
    audience    TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    body        TEXT NOT NULL
);
CREATE INDEX grants_live_by_expiry ON grants (expires_at) WHERE state IN ('active', 'pending');
CREATE INDEX grants_by_workload ON grants (workload, created_at);
CREATE INDEX grants_by_task ON grants (task_id);

-- The audit log: append-only, each entry chained to the one before by hash.
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    grant_id  TEXT,
    actor     TEXT NOT NULL,
    data      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_by_grant ON audit (grant_id) WHERE grant_id IS NOT NULL;

-- The signed head of the chain, rewritten with every commit: an attacker who edits
-- the log and recomputes hashes cannot re-sign the head.
CREATE TABLE audit_checkpoint (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    seq       INTEGER NOT NULL,
    hash      TEXT NOT NULL,
    kid       TEXT NOT NULL,
    signature TEXT NOT NULL,
    at        INTEGER NOT NULL
);
