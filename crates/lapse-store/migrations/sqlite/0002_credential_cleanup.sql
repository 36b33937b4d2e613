-- Provider credentials owed a destroy: when the next attempt is due (NULL when none).
ALTER TABLE grants ADD COLUMN cleanup_at INTEGER;
CREATE INDEX grants_cleanup_due ON grants (cleanup_at) WHERE cleanup_at IS NOT NULL;
CREATE INDEX grants_by_audience ON grants (audience, state);
