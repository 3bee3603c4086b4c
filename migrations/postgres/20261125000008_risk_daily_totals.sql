-- The approved amount per source account, UTC day and currency: what the daily limit is
-- checked against. Kept as evaluations are stored, so an evaluation reads one row rather
-- than summing the account's whole day. A missing row is summed from the day's evaluations
-- once, when the account is first evaluated (so evaluations stored before this table count).
CREATE TABLE risk.daily_totals (
    account_id uuid NOT NULL,
    day        date NOT NULL,
    currency   text NOT NULL,
    approved   numeric NOT NULL CHECK (approved >= 0),
    PRIMARY KEY (account_id, day, currency)
);
