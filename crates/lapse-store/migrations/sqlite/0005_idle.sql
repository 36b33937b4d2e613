-- When an active grant with an `@idle` window is due to be revoked for lack of
-- reported use; moves forward with each use report.
ALTER TABLE grants ADD COLUMN idle_at INTEGER;
CREATE INDEX grants_idle_due ON grants (idle_at) WHERE idle_at IS NOT NULL;
