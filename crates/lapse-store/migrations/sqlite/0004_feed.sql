-- The revocation feed: every grant that ends while active, in commit order, under a
-- gap-free sequence number. Written in the same transaction as the ending itself, so
-- no ending is committed without its feed entry. Gates follow it and resume from a
-- sequence number after a reconnect.
CREATE TABLE feed (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    grant_id  TEXT NOT NULL,
    state     TEXT NOT NULL,
    audience  TEXT NOT NULL,
    jti       TEXT,
    exp       INTEGER NOT NULL,
    reason    TEXT NOT NULL
);
