-- The risk worker's evaluations on SQLite (the embedded default); same columns as PostgreSQL's.
CREATE TABLE evaluations (
    transfer_id  BLOB PRIMARY KEY,
    from_account BLOB NOT NULL,
    to_account   BLOB NOT NULL,
    amount       TEXT NOT NULL,
    currency     TEXT NOT NULL,
    score        INTEGER NOT NULL CHECK (score BETWEEN 0 AND 100),
    level        TEXT NOT NULL CHECK (level IN ('low', 'medium', 'high')),
    rules        TEXT NOT NULL,
    decision     TEXT NOT NULL CHECK (decision IN ('yes', 'no')),
    message_id   BLOB NOT NULL,
    reply        TEXT NOT NULL,
    evaluated_at TEXT NOT NULL
);
CREATE INDEX evaluations_by_source ON evaluations (from_account, evaluated_at);
