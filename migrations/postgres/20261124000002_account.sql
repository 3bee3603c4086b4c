-- The account worker's state: balances, holds on sources, reserved credits on destinations,
-- the ledger every balance can be replayed from, and the replies of applied commands.
CREATE SCHEMA IF NOT EXISTS account;

CREATE TABLE account.accounts (
    account_id uuid PRIMARY KEY,
    currency   text NOT NULL,
    status     text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'frozen', 'closed')),
    balance    numeric NOT NULL DEFAULT 0,
    held       numeric NOT NULL DEFAULT 0 CHECK (held >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Invariant 2, enforced by the database as a last line: no overdraft.
    CONSTRAINT no_overdraft CHECK (balance - held >= 0)
);

-- A hold on a transfer's source. 'voided': the abort arrived before the hold (an empty
-- compensation); a late hold for the transfer is then refused.
CREATE TABLE account.holds (
    transfer_id uuid PRIMARY KEY,
    account_id  uuid NOT NULL,
    amount      numeric NOT NULL CHECK (amount > 0),
    currency    text NOT NULL,
    status      text NOT NULL CHECK (status IN ('held', 'captured', 'released', 'voided')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX holds_open ON account.holds (account_id) WHERE status = 'held';

-- A credit reserved on a transfer's destination; 'voided' as for holds.
CREATE TABLE account.credits (
    transfer_id uuid PRIMARY KEY,
    account_id  uuid NOT NULL,
    amount      numeric NOT NULL CHECK (amount > 0),
    currency    text NOT NULL,
    status      text NOT NULL CHECK (status IN ('reserved', 'credited', 'cancelled', 'voided')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credits_open ON account.credits (account_id) WHERE status = 'reserved';

CREATE TABLE account.ledger (
    entry_id      bigserial PRIMARY KEY,
    account_id    uuid NOT NULL REFERENCES account.accounts (account_id),
    transfer_id   uuid,
    kind          text NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'debit', 'credit')),
    amount        numeric NOT NULL CHECK (amount > 0),
    currency      text NOT NULL,
    balance_after numeric NOT NULL,
    reference     text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind IN ('debit', 'credit')) = (transfer_id IS NOT NULL))
);
-- A transfer debits its source once and credits its destination once, whatever is redelivered.
CREATE UNIQUE INDEX ledger_once_per_transfer ON account.ledger (transfer_id, kind)
    WHERE transfer_id IS NOT NULL;
CREATE INDEX ledger_by_account ON account.ledger (account_id, entry_id);
CREATE INDEX ledger_by_time ON account.ledger (created_at);

-- Every command applied, with the reply it got: a redelivered command gets the same reply.
CREATE TABLE account.processed_commands (
    transfer_id  uuid NOT NULL,
    action       text NOT NULL,
    account_id   uuid NOT NULL,
    message_id   uuid NOT NULL,
    reply_type   text NOT NULL,
    reply        jsonb NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transfer_id, action)
);
