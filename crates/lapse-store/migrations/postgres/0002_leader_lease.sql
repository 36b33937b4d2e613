-- The lease on the singleton jobs (sweeper, credential cleanup, reconciler). A
-- replica holds it while `expires_at` (the database's clock, so replicas' clocks
-- need not agree) is ahead and renews it well before; another takes it over once it
-- lapses, with a higher `generation`. Leader-only writes carry the generation they
-- were started under and are refused once it has moved on, so a leader that
-- stalled (SIGSTOP, a VM pause, a long GC) cannot write as leader when it wakes.
-- This replaces the session advisory lock, which a frozen process kept: its
-- kernel still answered the keepalives.
CREATE TABLE leader_lease (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    holder     TEXT NOT NULL,
    generation BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO leader_lease (id, holder, generation, expires_at) VALUES (1, '', 0, '-infinity');
