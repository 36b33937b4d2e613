-- Quarantined workloads: no new grants or renewals while a row stands (on the
-- audiences it names; all when empty). Set by a `workload-quarantined` signal,
-- lifted by an operator; both in audited commits.
CREATE TABLE quarantines (
    workload TEXT PRIMARY KEY,
    body     TEXT NOT NULL
);
