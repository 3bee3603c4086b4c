-- The coordinator's saga state on SQLite (the embedded default). Same columns as PostgreSQL's
-- coordinator.transfers; amounts are decimal text and times fixed-width RFC 3339 text.
CREATE TABLE transfers (
    transfer_id        BLOB PRIMARY KEY,
    request_hash       TEXT NOT NULL,
    request            TEXT NOT NULL,
    from_account       BLOB,
    to_account         BLOB,
    amount             TEXT,
    currency           TEXT,
    status             TEXT NOT NULL CHECK (status IN
                         ('preparing', 'committing', 'aborting', 'completed', 'failed', 'rejected')),
    risk_vote          TEXT CHECK (risk_vote IN ('yes', 'no')),
    source_vote        TEXT CHECK (source_vote IN ('yes', 'no')),
    destination_vote   TEXT CHECK (destination_vote IN ('yes', 'no')),
    risk_assessment    TEXT,
    reason             TEXT,
    reason_detail      TEXT,
    failed_participant TEXT,
    captured           BOOLEAN NOT NULL DEFAULT false,
    credited           BOOLEAN NOT NULL DEFAULT false,
    released           BOOLEAN NOT NULL DEFAULT false,
    credit_cancelled   BOOLEAN NOT NULL DEFAULT false,
    traceparent        TEXT,
    tracestate         TEXT,
    request_message_id BLOB,
    prepare_deadline   TEXT,
    resend_attempts    INTEGER NOT NULL DEFAULT 0,
    next_resend_at     TEXT,
    created_at         TEXT NOT NULL,
    decided_at         TEXT,
    finished_at        TEXT,
    updated_at         TEXT NOT NULL
);

CREATE INDEX transfers_preparing ON transfers (prepare_deadline) WHERE status = 'preparing';
CREATE INDEX transfers_deciding ON transfers (next_resend_at) WHERE status IN ('committing', 'aborting');
