-- Spent DPoP proof `jti`s, shared by every process on this store: a proof replayed
-- to another process is refused too. Pruned once the proof could not be accepted.
CREATE TABLE nonces (
    value      TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE INDEX nonces_by_expiry ON nonces (expires_at);
-- The signing key ring (when a key-encryption key is configured): public keys and
-- private keys sealed under the key-encryption key, never in the clear.
CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,
    alg          TEXT NOT NULL,
    public       BLOB NOT NULL,
    sealed       BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    activates_at INTEGER NOT NULL,
    retires_at   INTEGER
);
