-- The account worker's state on SQLite (the embedded default). Same tables as PostgreSQL's
-- account schema; amounts are decimal text (SQLite's own numbers are floats), so the
-- no-overdraft rule is enforced by the worker, which computes every balance in exact decimals.
CREATE TABLE accounts (
    account_id BLOB PRIMARY KEY,
    currency   TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'frozen', 'closed')),
    balance    TEXT NOT NULL DEFAULT '0',
    held       TEXT NOT NULL DEFAULT '0',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE holds (
    transfer_id BLOB PRIMARY KEY,
    account_id  BLOB NOT NULL,
    amount      TEXT NOT NULL,
    currency    TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('held', 'captured', 'released', 'voided')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX holds_open ON holds (account_id) WHERE status = 'held';

CREATE TABLE credits (
    transfer_id BLOB PRIMARY KEY,
    account_id  BLOB NOT NULL,
    amount      TEXT NOT NULL,
    currency    TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('reserved', 'credited', 'cancelled', 'voided')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX credits_open ON credits (account_id) WHERE status = 'reserved';

CREATE TABLE ledger (
    entry_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id    BLOB NOT NULL REFERENCES accounts (account_id),
    transfer_id   BLOB,
    kind          TEXT NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'debit', 'credit')),
    amount        TEXT NOT NULL,
    currency      TEXT NOT NULL,
    balance_after TEXT NOT NULL,
    reference     TEXT,
    created_at    TEXT NOT NULL,
    CHECK ((kind IN ('debit', 'credit')) = (transfer_id IS NOT NULL))
);
CREATE UNIQUE INDEX ledger_once_per_transfer ON ledger (transfer_id, kind)
    WHERE transfer_id IS NOT NULL;
CREATE INDEX ledger_by_account ON ledger (account_id, entry_id);
CREATE INDEX ledger_by_time ON ledger (created_at);

CREATE TABLE processed_commands (
    transfer_id  BLOB NOT NULL,
    action       TEXT NOT NULL,
    account_id   BLOB NOT NULL,
    message_id   BLOB NOT NULL,
    reply_type   TEXT NOT NULL,
    reply        TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (transfer_id, action)
);
