-- Listing grants in one state, newest first (the approvers' pending list, the
-- console's active grants) without scanning or sorting the whole table.
CREATE INDEX grants_by_state ON grants (state, created_at, id);
