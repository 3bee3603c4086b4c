-- The risk worker's evaluations: every one with its score, level and the rules that fired.
-- Velocity and daily totals are computed from this table.
CREATE SCHEMA IF NOT EXISTS risk;

CREATE TABLE risk.evaluations (
    transfer_id  uuid PRIMARY KEY,
    from_account uuid NOT NULL,
    to_account   uuid NOT NULL,
    amount       numeric NOT NULL,
    currency     text NOT NULL,
    score        smallint NOT NULL CHECK (score BETWEEN 0 AND 100),
    level        text NOT NULL CHECK (level IN ('low', 'medium', 'high')),
    rules        jsonb NOT NULL,
    decision     text NOT NULL CHECK (decision IN ('yes', 'no')),
    message_id   uuid NOT NULL,
    reply        jsonb NOT NULL,
    evaluated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX evaluations_by_source ON risk.evaluations (from_account, evaluated_at);
