-- A record is one row by its message id alone. Its topic/partition/offset may repeat: a
-- broker's offsets start again at 0 when a topic is made anew (deleted and created, a new
-- cluster, the embedded broker of a restarted `twophase dev`), and the records written then are
-- new messages. Unique on the position, they were taken for ones already stored and dropped.
-- SQLite cannot drop a constraint, so the table is made again without it, rows, indexes and
-- triggers as they were (dropping a table fires no DELETE trigger).
CREATE TABLE audit_log_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    topic            TEXT NOT NULL,
    kafka_partition  INTEGER NOT NULL,
    kafka_offset     INTEGER NOT NULL,
    chain_seq        INTEGER NOT NULL CHECK (chain_seq > 0),
    message_id       BLOB NOT NULL,
    message_key      TEXT,
    event_type       TEXT NOT NULL,
    entity_type      TEXT,
    entity_id        TEXT,
    transfer_id      TEXT,
    action           TEXT,
    actor_id         TEXT,
    actor_type       TEXT,
    correlation_id   TEXT,
    causation_id     TEXT,
    trace_id         TEXT,
    span_id          TEXT,
    severity         TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'error', 'critical')),
    payload_encoding TEXT NOT NULL CHECK (payload_encoding IN ('json', 'base64', 'none')),
    payload          TEXT NOT NULL,
    headers          TEXT NOT NULL,
    ip_address       TEXT,
    user_agent       TEXT,
    occurred_at      TEXT NOT NULL,
    occurred_at_us   INTEGER NOT NULL,
    recorded_at      TEXT NOT NULL,
    prev_hash        TEXT NOT NULL,
    hash             TEXT NOT NULL,
    CONSTRAINT audit_log_once_per_message UNIQUE (message_id),
    CONSTRAINT audit_log_one_row_per_link UNIQUE (topic, kafka_partition, chain_seq)
);

INSERT INTO audit_log_new SELECT * FROM audit_log;
DROP TABLE audit_log;
ALTER TABLE audit_log_new RENAME TO audit_log;

CREATE INDEX audit_log_by_time ON audit_log (occurred_at DESC, id DESC);
CREATE INDEX audit_log_by_entity ON audit_log (entity_id, occurred_at DESC, id DESC);
CREATE INDEX audit_log_by_entity_type ON audit_log (entity_type, occurred_at DESC, id DESC);
CREATE INDEX audit_log_by_event_type ON audit_log (event_type, occurred_at DESC, id DESC);
CREATE INDEX audit_log_by_severity ON audit_log (severity, occurred_at DESC, id DESC);
CREATE INDEX audit_log_by_transfer ON audit_log (transfer_id, occurred_at_us, kafka_offset)
    WHERE transfer_id IS NOT NULL;

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit rows are append-only');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit rows are append-only');
END;
