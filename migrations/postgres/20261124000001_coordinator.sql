-- The coordinator's saga state: one row per transfer, moved through
-- preparing -> committing -> completed, preparing -> aborting -> failed, or straight to rejected.
CREATE SCHEMA IF NOT EXISTS coordinator;

CREATE TABLE coordinator.transfers (
    transfer_id        uuid PRIMARY KEY,
    -- SHA-256 of the request's canonical body: the same id with another body is a conflict.
    request_hash       text NOT NULL,
    request            jsonb NOT NULL,
    -- Null only for rejected requests, whose fields may not parse.
    from_account       uuid,
    to_account         uuid,
    amount             numeric,
    currency           text,
    status             text NOT NULL CHECK (status IN
                         ('preparing', 'committing', 'aborting', 'completed', 'failed', 'rejected')),
    risk_vote          text CHECK (risk_vote IN ('yes', 'no')),
    source_vote        text CHECK (source_vote IN ('yes', 'no')),
    destination_vote   text CHECK (destination_vote IN ('yes', 'no')),
    risk_assessment    jsonb,
    reason             text,
    reason_detail      text,
    failed_participant text,
    captured           boolean NOT NULL DEFAULT false,
    credited           boolean NOT NULL DEFAULT false,
    released           boolean NOT NULL DEFAULT false,
    credit_cancelled   boolean NOT NULL DEFAULT false,
    -- The request's trace context, continued by every command the coordinator sends.
    traceparent        text,
    tracestate         text,
    request_message_id uuid,
    prepare_deadline   timestamptz,
    -- Commit or abort commands re-sent so far, and when they are next due.
    resend_attempts    integer NOT NULL DEFAULT 0,
    next_resend_at     timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    decided_at         timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (status = 'rejected' OR (from_account IS NOT NULL AND to_account IS NOT NULL
                                   AND amount > 0 AND currency IS NOT NULL))
);

-- The timers scan only the transfers still in flight.
CREATE INDEX transfers_preparing ON coordinator.transfers (prepare_deadline)
    WHERE status = 'preparing';
CREATE INDEX transfers_deciding ON coordinator.transfers (next_resend_at)
    WHERE status IN ('committing', 'aborting');
