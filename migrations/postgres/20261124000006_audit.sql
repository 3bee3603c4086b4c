-- The audit trail: every message on the saga topics, their dead-letter topics,
-- reconciliation.reports and ops.replays, stored once and never changed.
--
-- Once: a Kafka record is one row (unique on topic/partition/offset), and a message published
-- twice is one row (unique on message_id), so redelivery and restarts never add a row.
-- Never changed: the triggers below refuse UPDATE, DELETE and TRUNCATE.
-- Tamper-evident: each row carries `hash`, the SHA-256 of its canonical content and of the
-- previous row's hash in its chain. There is one chain per Kafka partition of origin
-- (topic, kafka_partition), ordered by chain_seq; `twophase audit verify` walks them.
CREATE TABLE audit.audit_log (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic            text NOT NULL,
    kafka_partition  integer NOT NULL,
    kafka_offset     bigint NOT NULL,
    -- The row's position in the chain of (topic, kafka_partition), from 1 without gaps.
    chain_seq        bigint NOT NULL CHECK (chain_seq > 0),
    -- The ce_id; derived from the record for dead letters, replays and id-less records.
    message_id       uuid NOT NULL,
    message_key      text,
    event_type       text NOT NULL,
    entity_type      text,
    entity_id        text,
    transfer_id      text,
    action           text,
    actor_id         text,
    actor_type       text,
    correlation_id   text,
    causation_id     text,
    trace_id         text,
    span_id          text,
    severity         text NOT NULL CHECK (severity IN ('info', 'warning', 'error', 'critical')),
    -- 'json': payload is the message's JSON; 'base64': its bytes were not JSON and payload is
    -- a JSON string of them in base64; 'none': the record had no payload (payload is null).
    payload_encoding text NOT NULL CHECK (payload_encoding IN ('json', 'base64', 'none')),
    payload          jsonb NOT NULL,
    -- Every Kafka header in order, as [name, value] pairs.
    headers          jsonb NOT NULL,
    ip_address       text,
    user_agent       text,
    occurred_at      timestamptz NOT NULL,
    -- occurred_at in microseconds since the epoch: orders a transfer's timeline finer than
    -- the millisecond occurred_at keeps.
    occurred_at_us   bigint NOT NULL,
    recorded_at      timestamptz NOT NULL,
    prev_hash        text NOT NULL,
    hash             text NOT NULL,
    CONSTRAINT audit_log_once_per_record UNIQUE (topic, kafka_partition, kafka_offset),
    CONSTRAINT audit_log_once_per_message UNIQUE (message_id),
    -- Two writers can never both extend a chain from the same row.
    CONSTRAINT audit_log_one_row_per_link UNIQUE (topic, kafka_partition, chain_seq)
);

-- GET /audit/logs: newest first, alone or under each filter; id breaks ties so pages are stable.
-- Each filter's index carries the other low-cardinality filter columns, so that a combination
-- of filters (and its count) is answered from the index without visiting the table.
CREATE INDEX audit_log_by_time ON audit.audit_log (occurred_at DESC, id DESC)
    INCLUDE (entity_type, event_type, severity);
-- Entity ids are near unique, so the type is checked on the few rows of an id; a type alone
-- (some are rare: replay, reconciliation) has an index of its own.
CREATE INDEX audit_log_by_entity ON audit.audit_log (entity_id, occurred_at DESC, id DESC)
    INCLUDE (entity_type, event_type, severity);
CREATE INDEX audit_log_by_entity_type ON audit.audit_log (entity_type, occurred_at DESC, id DESC)
    INCLUDE (event_type, severity);
CREATE INDEX audit_log_by_event_type ON audit.audit_log (event_type, occurred_at DESC, id DESC)
    INCLUDE (entity_type, severity);
CREATE INDEX audit_log_by_severity ON audit.audit_log (severity, occurred_at DESC, id DESC)
    INCLUDE (entity_type, event_type);
-- GET /transfers/{id}/timeline.
CREATE INDEX audit_log_by_transfer ON audit.audit_log (transfer_id, occurred_at_us, kafka_offset)
    WHERE transfer_id IS NOT NULL;

CREATE FUNCTION audit.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit rows are append-only: % on %.% refused', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit.audit_log
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
